"""Secure aggregation (Bonawitz et al. 2017) with the SecAgg+ neighbour graph (Bell et al. 2020).

Pure pieces both sides use, no sockets, threads or clocks, and no numba (devices import them):

``fixedpoint``  a weighted update as integers mod 2^32, and the headroom rule that keeps a sum of
                ``max_devices`` of them from wrapping
``crypto``      X25519 key agreement, HKDF, the AES-CTR mask generator, AES-GCM share sealing
``shamir``      Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1)
``graph``       the SecAgg+ neighbour graph: k neighbours per device on a seeded permutation
``client``      one device's side of one round (keys, shares, masked input, unmasking answer)
``unmask``      the server's arithmetic: remove the masks from the masked sum
``noise``       differential privacy's distributed noise: a device's clip and noise share
"""
