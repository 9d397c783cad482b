"""Figures we compare against but did not measure, each with its source. Nothing here is a measurement of ours.

Used by benchmarks/gpu_bench.py (recorded beside every GPU run) and benchmarks/report.py (for records that predate
that), so the two cannot disagree.
"""

from __future__ import annotations

# Dense (no 2:4 structured sparsity) bf16 tensor-core peak, TFLOP/s, by the device name torch reports.
# NVIDIA's H200 datasheet (nvidia.com/en-us/data-center/h200/, "BF16 Tensor Core: 1,979 TFLOPS", footnote: with
# sparsity) gives the sparse figure; dense is half of it. H100 SXM has the same compute (GH100): 1,979 / 989.5.
DATASHEET_DENSE_BF16_TFLOPS: dict[str, float] = {
    "NVIDIA H200": 989.5,
    "NVIDIA H100 80GB HBM3": 989.5,
}
DATASHEET_SOURCE = "NVIDIA's H200 SXM datasheet: BF16 tensor core 1,979 TFLOPS with 2:4 sparsity, half of it dense"


def datasheet_tflops(gpu_name: str | None) -> float | None:
    """The dense bf16 datasheet peak of a device by its torch name, or None when this table does not know it."""
    return DATASHEET_DENSE_BF16_TFLOPS.get(gpu_name or "")


# Ho, Jain, Abbeel 2020, Appendix B: the CIFAR-10 model (35.7M) "trains at 21 steps per second at batch size 128"
# on a TPU v3-8, and "sampling a batch of 256 images takes 17 seconds".
PAPER_TPU_V3_8 = {
    "source": "Ho et al. 2020, Appendix B (TPU v3-8, CIFAR-10 model)",
    "train_steps_per_s": 21,
    "train_batch": 128,
    "sample_batch": 256,
    "sample_batch_s": 17,
}
