"""Byte units, each written once. Config sizes and tier budgets are in GiB (LMCache's keys are);
AWS lists local NVMe in decimal GB."""

GIB = 1024**3
GB = 1000**3
