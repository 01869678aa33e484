"""Performance tooling: analytic FLOP counts, the benchmark sections and the torch.compile switch.

Nothing here changes what the model computes; it measures it (``benchmark``), counts it
(``flops``), times its paths side by side (``paths``) or asks PyTorch to compile it (``compile``).
"""
