"""Test set-up: four logical CPU devices before TensorFlow initialises."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tf_smdist as smd  # noqa: E402

NUM_CPU_DEVICES = 4
smd.configure_cpu_devices(NUM_CPU_DEVICES)
