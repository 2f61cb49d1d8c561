"""Test doubles for machines without a GPU: the CuPy stand-in and the host kernel emulator."""
