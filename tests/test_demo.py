"""The browser demo (captioning/serve): its JSON endpoint over HTTP, and the page in a real
headless Chromium driven by Selenium. The browser tests skip, saying why, where Chromium, its
driver or Selenium is not installed (Debian: apt-get install chromium chromium-driver)."""

from __future__ import annotations

import io
import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from captioning import Captioner
from captioning.serve.server import MAX_UPLOAD_BYTES, make_server
from conftest import own_copy, save_untrained_checkpoint



def sharpen_attention(ckpt: Path) -> None:
    """Scale the untrained model's attention keys so that its attention moves from word to word
    (random weights otherwise spread it almost evenly)."""
    data = torch.load(ckpt, weights_only=True)
    for key in list(data["state_dict"]):
        if key.endswith("attention.score.W.weight") or key.endswith("decoder.init_h.weight"):
            data["state_dict"][key] = data["state_dict"][key] * 8.0
    torch.save(data, ckpt)


@pytest.fixture(scope="module")
def demo(untrained, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    run = untrained("decode.max_len=6")
    ckpt = own_copy(run.ckpt, root / "run")
    sharpen_attention(ckpt)
    captioner = Captioner.from_checkpoint(ckpt, device="cpu")
    examples = run.test_paths
    server = make_server(captioner, "127.0.0.1", 0, examples)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    photo = root / "photo.png"  # an upload: a test image of the synthetic set, enlarged
    Image.open(examples[0]).resize((160, 160), Image.Resampling.NEAREST).save(photo)
    yield SimpleNamespace(url=url, server=server, captioner=captioner, examples=examples, photo=photo, root=root)
    server.shutdown()
    server.server_close()


def post(url: str, body: bytes, query: str = "", content_type: str = "application/octet-stream") -> tuple[int, dict]:
    """POST ``body`` to /api/caption -> (status, the JSON answer)."""
    request = urllib.request.Request(f"{url}/api/caption?{query}", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# ----------------------------------------------------------------------------- the endpoint


def test_caption_endpoint_matches_the_api(demo):
    status, data = post(demo.url, demo.photo.read_bytes(), "method=beam&beam_size=3&n_best=2")
    assert status == 200
    expected = demo.captioner.caption(demo.photo, beam_size=3, n_best=2)[0]
    assert [c["words"] for c in data["captions"]] == [expected.words] + [a.words for a in expected.alternatives]
    first = data["captions"][0]
    assert np.asarray(first["attention"]).shape == (len(first["words"]), data["grid"], data["grid"])
    status, greedy = post(demo.url, b"", "method=greedy&example=0")
    assert status == 200 and len(greedy["captions"]) == 1
    assert greedy["captions"][0]["words"] == demo.captioner.caption(demo.examples[0], beam_size=1)[0].words
    status, sampled = post(demo.url, b"", "method=sample&temperature=2&top_k=5&seed=1&n_best=3&example=1")
    assert status == 200 and 1 <= len(sampled["captions"]) <= 3


@pytest.mark.parametrize("body,query,status,message", [
    (b"this is not an image\n", "", 400, "cannot be read as an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "", 400, "cannot be read as an image"),
    (b"", "", 400, "no image"),
    (b"", "example=99", 404, "no example image"),
    (None, "", 400, "temperature must be a number from 0.01 to 100"),
    (None, "method=beam&beam_size=abc", 400, "beam_size must be a whole number"),
])
def test_bad_requests_get_one_line_errors_and_the_server_keeps_serving(demo, body, query, status, message):
    if body is None:  # a good image, bad options
        body = demo.photo.read_bytes()
        query = query or "method=sample&temperature=-1"
    code, data = post(demo.url, body, query)
    assert code == status
    assert message in data["error"] and "\n" not in data["error"]
    assert str(demo.root) not in data["error"]  # the server's temporary paths stay private
    assert post(demo.url, demo.photo.read_bytes(), "method=greedy")[0] == 200


@pytest.mark.parametrize("query,message", [
    ("method=beam&beamsize=7&foo=1", "unknown query options 'beamsize', 'foo'"),
    ("method=beam&beam_size=3&beam_size=7", "beam_size is given 2 times"),
    ("method=greedy&no_unk=maybe", "no_unk must be 1 or 0"),
    ("method=greedy&beam_size=7", "method=greedy does not use beam_size"),
    ("method=greedy&n_best=3&temperature=2", "method=greedy does not use n_best, temperature"),
    ("method=beam&top_k=5", "method=beam does not use top_k"),
    ("method=sample&beam_size=2", "method=sample does not use beam_size"),
    ("method=beam&seed=1", "seed is used by method=sample or hard_mode=sample only"),
])
def test_options_a_request_does_not_use_are_refused(demo, query, message):
    code, data = post(demo.url, demo.photo.read_bytes(), query)
    assert code == 400 and message in data["error"] and "\n" not in data["error"], data


def test_no_unk_reads_the_usual_words_for_yes_and_no(demo):
    for value, expected in (("yes", True), ("on", True), ("1", True), ("no", False), ("false", False)):
        code, data = post(demo.url, demo.photo.read_bytes(), f"method=greedy&no_unk={value}")
        assert code == 200 and data["settings"].get("no_unk", False) is expected, (value, data["settings"])


def test_options_sent_as_form_fields_are_refused_with_where_they_go(demo):
    body, ctype = multipart([("file", "photo.png", demo.photo.read_bytes(), "image/png"),
                             ("beam_size", None, b"7", None)])
    code, data = post(demo.url, body, "method=beam", ctype)
    assert code == 400 and "beam_size" in data["error"] and "in the query" in data["error"], data


def test_truncated_jpeg_and_oversized_upload(demo):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="JPEG")
    code, data = post(demo.url, buffer.getvalue()[:200])
    assert code == 400 and "cannot be read as an image" in data["error"]
    code, data = post(demo.url, b"\0" * (MAX_UPLOAD_BYTES + 1))
    assert code == 413 and "MiB" in data["error"]
    assert post(demo.url, demo.photo.read_bytes(), "method=greedy")[0] == 200


def test_an_example_that_cannot_be_read_is_named_and_answered_404(demo, tmp_path):
    """Messages about an example name it (not "the upload"); one truncated, or gone from disk after
    the start, gets a 404 naming it, from the caption endpoint and from /api/example/<i> alike."""
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    shutil.copy(demo.examples[0], good)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="JPEG")
    bad.write_bytes(buffer.getvalue()[:200])
    server = make_server(demo.captioner, "127.0.0.1", 0, [good, bad])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        code, data = post(url, b"", "method=greedy&example=1")
        assert code == 404 and "example image 1 (bad.jpg) cannot be read as an image" in data["error"], data
        assert "upload" not in data["error"] and str(tmp_path) not in data["error"]
        good.unlink()
        code, data = post(url, b"", "method=greedy&example=0")
        assert code == 404 and "example image 0 (good.png) is no longer a readable file" in data["error"], data
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"{url}/api/example/0", timeout=60)
        assert answer.value.code == 404
        assert "example image 0 (good.png) is no longer a readable file" in json.loads(answer.value.read())["error"]
        assert post(url, demo.photo.read_bytes(), "method=greedy")[0] == 200  # still serving
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- uploads as tools send them


def multipart(fields: list[tuple[str, str | None, bytes, str | None]], boundary: str = "------------------------d74496d66958873e") -> tuple[bytes, str]:
    """A multipart/form-data body as curl -F builds it: (name, filename or None, bytes, type or None)."""
    out = b""
    for name, filename, data, ctype in fields:
        out += f"--{boundary}\r\n".encode()
        disposition = f'Content-Disposition: form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += disposition.encode() + b"\r\n"
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def test_multipart_upload_as_curl_sends_it(demo):
    expected = demo.captioner.caption(demo.photo, beam_size=1)[0].words
    body, ctype = multipart([("note", None, b"hello", None), ("file", "photo.png", demo.photo.read_bytes(), "image/png")])
    status, data = post(demo.url, body, "method=greedy", ctype)
    assert status == 200 and data["captions"][0]["words"] == expected
    body, ctype = multipart([("upload", "photo.png", demo.photo.read_bytes(), "application/octet-stream")])
    assert post(demo.url, body, "method=greedy", ctype)[1]["captions"][0]["words"] == expected  # any file field
    curl = shutil.which("curl")
    if curl is not None:  # the tool itself, where it is installed
        import subprocess

        out = subprocess.run([curl, "-sS", "-F", f"file=@{demo.photo}", f"{demo.url}/api/caption?method=greedy"],
                             capture_output=True, timeout=60, check=True).stdout
        assert json.loads(out)["captions"][0]["words"] == expected


@pytest.mark.parametrize("fields,ctype,message", [
    ([("file", "notes.txt", b"not an image", "text/plain")], None,
     "the file 'notes.txt' of the multipart/form-data field 'file' cannot be read as an image"),
    ([("caption", None, b"a red square", None)], None, "the multipart/form-data upload holds no file (fields: 'caption')"),
    ([("file", "", b"", "application/octet-stream")], None, "is empty: no image was chosen"),
    (None, "text/plain", "the request body (text/plain) cannot be read as an image"),
    ([("file", "photo.png", b"x", "image/png")], "application/octet-stream",
     "the body is multipart/form-data but its Content-Type is application/octet-stream"),
    (None, "multipart/form-data", "the multipart/form-data body cannot be parsed"),
])
def test_an_upload_that_holds_no_image_says_which_form_it_came_in(demo, fields, ctype, message):
    if fields is None:
        body, given = b"this is not an image\n", ctype
    else:
        body, given = multipart(fields)
        given = ctype or given
    code, data = post(demo.url, body, content_type=given)
    assert code == 400 and message in data["error"] and "\n" not in data["error"], data
    if "request body" in message:
        assert "multipart/form-data field 'file' (curl -F file=@photo.jpg)" in data["error"]


# ----------------------------------------------------------------------------- bounds


def raw_request(url: str, data: bytes, wait: float = 10.0, half_close: bool = False) -> bytes:
    """Send ``data`` over a new connection; -> all the server answered before closing (or ``wait`` s)."""
    import socket

    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            answer += b"<no answer: timed out>"
    return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else -1


@pytest.mark.parametrize("headers,status,message", [
    ("Content-Length: -1", 400, "Content-Length must be a whole number"),
    ("Content-Length: abc", 400, "Content-Length must be a whole number"),
    ("Content-Length: 1_0", 400, "Content-Length must be a whole number"),
    ("Content-Length: 5\r\nContent-Length: 7", 400, "Content-Length must be a whole number"),
    ("Transfer-Encoding: chunked", 411, "not in chunks"),
    ("", 411, "has no Content-Length"),
])
def test_a_bad_content_length_is_refused_before_the_body_is_read(demo, headers, status, message):
    """The body is never sent: a server that read it would wait for it (and time out here)."""
    head = "POST /api/caption HTTP/1.1\r\nHost: x\r\n" + (headers + "\r\n" if headers else "") + "\r\n"
    answer = raw_request(demo.url, head.encode(), wait=10.0)
    assert status_of(answer) == status, answer[:300]
    assert message in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


@pytest.mark.parametrize("request_line,status", [
    ("GET /api/example/" + "9" * 5000 + " HTTP/1.0", 404),
    ("GET /api/example/\u00b2 HTTP/1.0", 404),  # a non-ASCII digit, as a raw byte of the request line
    ("GET /api/example/%D9%A3 HTTP/1.0", 404),
    ("PUT /api/caption HTTP/1.0", 405),
    ("NONSENSE", 400),
])
def test_odd_requests_get_json_4xx_answers(demo, request_line, status):
    answer = raw_request(demo.url, request_line.encode("latin-1") + b"\r\n\r\n")
    assert status_of(answer) == status, answer[:300]
    assert "error" in json.loads(answer.split(b"\r\n\r\n", 1)[1])


@pytest.mark.parametrize("query,message", [
    ("method=sample&temperature=1e-300", "temperature must be a number from 0.01 to 100"),
    ("method=sample&temperature=nan", "temperature must be a number"),
    ("method=sample&temperature=inf", "temperature must be a number"),
    ("example=" + "7" * 5000, "no example image"),
    ("method=beam&beam_size=1_0", "beam_size must be a whole number"),
    ("method=sample&seed=\u0663", "seed must be a whole number"),
    ("method=beam&n_best=99", "n_best must be a whole number from 1 to 10"),
])
def test_numbers_are_parsed_and_bounded_in_one_place(demo, query, message):
    from urllib.parse import quote

    body = b"" if query.startswith("example=") else demo.photo.read_bytes()
    code, data = post(demo.url, body, quote(query, safe="=&"))
    assert code in (400, 404) and message in data["error"], data


def test_fifty_simultaneous_connections_are_all_served(demo):
    """With a listen backlog of 5, connections beyond the first few are dropped or reset while the
    server is busy; here all 50 arrive before the server accepts any, and all are answered."""
    import socket

    server = make_server(demo.captioner, "127.0.0.1", 0, demo.examples)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    socks = []
    try:
        for _ in range(50):  # the kernel holds them (the listen backlog): connecting does not wait for accept()
            socks.append(socket.create_connection(("127.0.0.1", server.server_port), timeout=3))
            socks[-1].sendall(b"GET /api/info HTTP/1.0\r\n\r\n")
        thread.start()
        answers = []
        for sock in socks:
            sock.settimeout(60)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            answers.append(status_of(data))
    finally:
        for sock in socks:
            sock.close()
        if thread.is_alive():
            server.shutdown()
        server.server_close()
    assert answers == [200] * 50


def test_silent_connections_are_closed_and_do_not_hold_the_server(demo):
    server = make_server(demo.captioner, "127.0.0.1", 0, demo.examples, timeout=1.0, workers=2, queue=2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        # Half-open connections (nothing sent, or half a request): closed after the timeout.
        assert raw_request(url, b"", wait=10.0) == b""
        assert raw_request(url, b"POST /api/caption HTTP/1.0\r\nContent-Length: 100\r\n\r\nabc", wait=10.0) == b""
        # More connections than workers and queue: the extra ones get a 503 at once, none waits forever.
        import socket

        idle = [socket.create_connection(("127.0.0.1", server.server_port), timeout=10) for _ in range(6)]
        try:
            answers = [raw_request(url, b"GET /api/info HTTP/1.0\r\n\r\n", wait=10.0) for _ in range(2)]
            assert all(status_of(a) in (200, 503) for a in answers), answers
        finally:
            for sock in idle:
                sock.close()
        import time

        deadline = time.monotonic() + 20  # served again once they are gone (their workers see them close)
        while status_of(raw_request(url, b"GET /api/info HTTP/1.0\r\n\r\n")) != 200:
            assert time.monotonic() < deadline, "the server stayed busy after the idle connections closed"
            time.sleep(0.2)
    finally:
        server.shutdown()
        server.server_close()


def test_clients_that_go_away_leave_no_tracebacks(demo, capfd):
    import socket
    import struct

    for i in range(20):
        sock = socket.create_connection(("127.0.0.1", demo.server.server_port), timeout=10)
        if i % 2:
            sock.sendall(b"POST /api/caption?method=greedy HTTP/1.0\r\nContent-Length: 100000\r\n\r\n" + b"\0" * 10)
        else:
            sock.sendall(b"POST /api/caption?method=greedy HTTP/1.0\r\nContent-Length: %d\r\n\r\n"
                         % demo.photo.stat().st_size + demo.photo.read_bytes())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        sock.close()
    assert post(demo.url, demo.photo.read_bytes(), "method=greedy")[0] == 200  # still serving
    import time

    time.sleep(0.5)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]


def test_page_and_info(demo):
    with urllib.request.urlopen(f"{demo.url}/", timeout=30) as r:
        page = r.read().decode()
    assert "/api/caption" in page and "http" not in page.replace("http-equiv", "")  # nothing external
    with urllib.request.urlopen(f"{demo.url}/api/info", timeout=30) as r:
        info = json.loads(r.read())
    assert info["attention"] == "soft" and len(info["examples"]) == len(demo.examples)
    assert info["training_data"] == demo.captioner.training_data
    assert info["trained_on"] == demo.captioner.trained_on
    assert "describes every image as coloured shapes" in info["note"]  # a synthetic model says so


def test_server_listens_on_loopback_by_default(demo):
    server = make_server(demo.captioner, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


@pytest.mark.parametrize("port", ["taken", "70000", "-1"])
def test_demo_that_cannot_listen_says_so_in_one_line(demo, capsys, port):
    """A port in use is refused by the system when the server binds, one out of 0-65535 by the
    command line before the checkpoint is read: one line and status 2 each, never a traceback."""
    import socket

    from captioning import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        given = str(taken.getsockname()[1]) if port == "taken" else port
        try:
            code = cli.main(["demo", "--checkpoint", str(demo.captioner.source), "--port", given, "--device", "cpu"])
        except SystemExit as exit_:  # argparse's refusal of the value
            code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    if port == "taken":
        assert f"cannot listen on 127.0.0.1:{given}" in err and "choose another --port" in err, err
        assert len(err.strip().splitlines()) == 1, err
    else:
        assert f"--port: expected a port from 0 to 65535, got {given}" in err, err


def test_demo_on_an_address_not_this_machines_names_the_host(demo, capsys):
    from captioning import cli

    code = cli.main(["demo", "--checkpoint", str(demo.captioner.source), "--host", "192.0.2.1", "--port", "0",
                     "--device", "cpu"])  # 192.0.2.0/24: reserved for documentation, never a local address
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot listen on 192.0.2.1:0" in err and "give a --host of this machine" in err, err


# ----------------------------------------------------------------------------- the browser

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,1000")


def find_browser() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (dev extra)")
    found = find_browser()
    if found is None:
        pytest.skip("no Chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=found[1]))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def heatmap_pixels(driver) -> str:
    return driver.execute_script("return document.getElementById('heatmap').toDataURL();")


def test_browser_upload_caption_and_word_heatmaps(demo, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(demo.url)
    wait.until(lambda d: "attention" in d.find_element(By.ID, "model").text)
    browser.find_element(By.CSS_SELECTOR, "input[name=method][value=greedy]").click()
    browser.find_element(By.ID, "file").send_keys(str(demo.photo))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".hyp .word"))
    words = browser.find_elements(By.CSS_SELECTOR, ".hyp .word")
    expected = demo.captioner.caption(demo.photo, beam_size=1)[0]
    assert [w.text for w in words] == expected.words
    assert browser.find_element(By.ID, "error").text == ""
    assert len(words) >= 2, "the test model must say at least two words"
    wait.until(lambda d: heatmap_pixels(d) != "data:,")
    first = heatmap_pixels(browser)
    words[1].click()
    wait.until(lambda d: "selected" in d.find_elements(By.CSS_SELECTOR, ".hyp .word")[1].get_attribute("class"))
    second = heatmap_pixels(browser)
    assert second != first  # another word, another heatmap
    assert f'"{expected.words[1]}"' in browser.find_element(By.ID, "legend").text
    browser.save_screenshot(str(Path("/tmp") / "demo_word_heatmap.png"))

    bad = demo.root / "notes.txt"
    bad.write_text("not an image")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    wait.until(lambda d: d.find_element(By.ID, "error").text)
    error = browser.find_element(By.ID, "error").text
    assert "the chosen file cannot be read as an image" in error and "curl" not in error  # a browser user's words
    # Nothing of the earlier image stays: no captions, no legend, an empty canvas.
    assert not browser.find_elements(By.CSS_SELECTOR, ".hyp") and browser.find_element(By.ID, "legend").text == ""
    assert browser.execute_script(
        "const c = document.getElementById('heatmap');"
        "return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.every(v => v === 0);")
    # The server kept serving: an example image still captions.
    browser.find_elements(By.CSS_SELECTOR, "#examples img")[0].click()
    wait.until(lambda d: d.find_element(By.ID, "error").text == "" and d.find_elements(By.CSS_SELECTOR, ".hyp"))


def test_browser_shows_a_panorama_at_its_own_aspect_with_a_named_scale(demo, browser, tmp_path):
    """A 1200x200 panorama is shown at 6:1 (the model squeezes it to a square; the page does not),
    its attention grid stretched over it as the model saw it, and the legend names its scale."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    pano = tmp_path / "panorama.png"
    Image.open(demo.examples[0]).resize((1200, 200), Image.Resampling.BICUBIC).save(pano)
    wait = WebDriverWait(browser, 60)
    browser.get(demo.url)
    wait.until(lambda d: "attention" in d.find_element(By.ID, "model").text)
    assert demo.captioner.trained_on in browser.find_element(By.ID, "model").text
    assert "coloured shapes" in browser.find_element(By.ID, "note").text
    browser.find_element(By.CSS_SELECTOR, "input[name=method][value=greedy]").click()
    browser.find_element(By.ID, "file").send_keys(str(pano))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".hyp .word"))
    canvas = browser.find_element(By.ID, "heatmap")
    wait.until(lambda d: "Scale:" in d.find_element(By.ID, "legend").text)
    size = browser.execute_script("const c = arguments[0]; return [c.width, c.height, c.clientWidth, c.clientHeight];",
                                  canvas)
    assert size[0] / size[1] == pytest.approx(6.0, rel=0.02) and size[2] / size[3] == pytest.approx(6.0, rel=0.02)
    shot = Image.open(io.BytesIO(canvas.screenshot_as_png))  # what the user sees, border included
    assert shot.width / shot.height == pytest.approx(6.0, rel=0.05), shot.size
    shot.save(Path("/tmp") / "demo_panorama.png")
    legend = browser.find_element(By.ID, "legend").text
    assert "Scale: absolute, attention weight 0 (dark) to 1 (bright)" in legend
    g, side = demo.captioner.grid_size, demo.captioner.image_size
    assert f"uniform level 1/{g * g}" in legend and f"squeezed to {side} pixels square" in legend
    absolute = heatmap_pixels(browser)
    Select(browser.find_element(By.ID, "scale")).select_by_value("word")
    wait.until(lambda d: "Scale: per word" in d.find_element(By.ID, "legend").text)
    assert heatmap_pixels(browser) != absolute  # the same map, stretched from its min to its max
    assert not browser.find_element(By.ID, "scalebar").get_attribute("hidden")


def test_hard_checkpoint_reports_where_each_word_looked(demo, tmp_path):
    cfg = demo.captioner.config
    from captioning.config import merge

    hard = merge(cfg, {"model": {"attention": "hard"}, "decode": {"hard_mode": "argmax"}})
    ckpt = save_untrained_checkpoint(hard, demo.captioner.vocab, tmp_path / "hard" / "best.ckpt")
    server = make_server(Captioner.from_checkpoint(ckpt, device="cpu"), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        for mode in ("argmax", "sample", "expected"):
            status, data = post(url, demo.photo.read_bytes(), f"method=greedy&hard_mode={mode}")
            assert status == 200 and data["settings"]["hard_mode"] == mode
            cap = data["captions"][0]
            if mode == "expected":
                assert cap["locations"] is None
                continue
            assert len(cap["locations"]) == len(cap["words"])
            for grid, loc in zip(cap["attention"], cap["locations"]):
                flat = np.asarray(grid).ravel()
                assert flat[loc] > 0
                if mode == "argmax":
                    assert loc == int(flat.argmax())
        # Sampled locations: a seed makes them repeatable, and the settings record it.
        answers = [post(url, demo.photo.read_bytes(), "method=greedy&hard_mode=sample&seed=1") for _ in range(2)]
        assert [a[0] for a in answers] == [200, 200] and answers[0][1]["settings"]["seed"] == 1
        assert answers[0][1]["captions"][0]["locations"] == answers[1][1]["captions"][0]["locations"]
        status, data = post(url, demo.photo.read_bytes(), "method=greedy&hard_mode=bogus")
        assert status == 400 and "hard_mode must be one of" in data["error"]
    finally:
        server.shutdown()
        server.server_close()
