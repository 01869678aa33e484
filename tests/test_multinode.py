"""Multi-node DDP as a cluster launches it, on one machine: two "nodes" of one CPU process each,
started separately and rendezvousing on 127.0.0.1 (Lightning's manual multi-node launch:
MASTER_ADDR, MASTER_PORT, NODE_RANK, WORLD_SIZE), must end with identical weights."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from captioning.config import SyntheticConfig
from captioning.data.synthetic import generate_synthetic
from test_training import tiny_args

REPO = Path(__file__).resolve().parents[1]

# Runs the train workflow (captioning.training.run) with one extra callback that writes, per rank, a hash of the
# parameters (and the REINFORCE baseline) when training starts and when it ends.
NODE = textwrap.dedent('''
    import hashlib, json, sys
    from pathlib import Path
    import pytorch_lightning as pl
    import torch
    sys.path.insert(0, sys.argv[1])
    from captioning.training import run as train

    def digest(named):
        h = hashlib.sha256()
        for name, tensor in sorted(named):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def weights(module):
        return digest(list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if n.startswith("baseline")])

    class Dump(pl.Callback):
        def on_train_start(self, trainer, module):
            self.start = weights(module)

        def on_train_end(self, trainer, module):
            out = Path(sys.argv[2]) / f"rank{trainer.global_rank}.json"
            out.write_text(json.dumps({"global_rank": trainer.global_rank, "node_rank": trainer.node_rank,
                                       "world_size": trainer.world_size, "global_step": trainer.global_step,
                                       "start": self.start, "end": weights(module)}))

    from captioning.training import trainer as trainer_module  # the run imports build_trainer from it
    build = trainer_module.build_trainer
    def build_with_dump(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callbacks.append(Dump())
        return trainer
    trainer_module.build_trainer = build_with_dump
    train.run(sys.argv[3:])
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_weights(path: Path) -> str:
    """The same digest as NODE's, from a Lightning checkpoint's state dict."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    module_params = {n for n in state if not n.startswith("baseline") and "running_" not in n
                     and "num_batches_tracked" not in n}
    h = hashlib.sha256()
    for name in sorted(module_params | {n for n in state if n.startswith("baseline")}):
        h.update(name.encode())
        h.update(state[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_two_nodes_end_with_identical_weights(tmp_path):
    data_root = tmp_path / "data"
    # Generated once beforehand, as a shared dataset folder would be on a cluster.
    generate_synthetic(data_root, SyntheticConfig(num_train=32, num_val=8, num_test=8, image_size=32), progress=False)
    out = tmp_path / "run"  # one output folder, as on a shared filesystem
    out.mkdir()
    node = tmp_path / "node.py"
    node.write_text(NODE)
    port = free_port()
    args = [*tiny_args(out, data_root), "--attention", "hard", "--num-nodes", "2", "--devices", "1",
            "--max-epochs", "2", "--no-test", "--set", "train.accelerator=cpu"]
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "GROUP_RANK", "SLURM_NTASKS")}
        env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank),
                    "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        cmd = [sys.executable, str(node), str(REPO), str(out), *args]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"node {rank} failed:\n{log[-3000:]}"

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["global_rank"], r["node_rank"], r["world_size"]) for r in ranks] == [(0, 0, 2), (1, 1, 2)]
    # 32 training images over 2 ranks of batch 8: 2 steps per epoch, 2 epochs.
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    assert ranks[0]["start"] == ranks[1]["start"]  # the same seed built the same initial weights
    assert ranks[0]["end"] != ranks[0]["start"]  # training moved them (each rank saw its own shard,
    assert ranks[0]["end"] == ranks[1]["end"]  # its own dropout and samples), and DDP kept them equal
    assert checkpoint_weights(out / "last.ckpt") == ranks[1]["end"]  # rank 0's checkpoint = rank 1's weights
