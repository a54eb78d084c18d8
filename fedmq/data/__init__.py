"""Package data: the digits images (``digits.npz``; see README.md here)."""
