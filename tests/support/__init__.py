"""Test support: test images, a real and a fake upstream, server processes."""
