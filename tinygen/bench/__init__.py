"""`tinygen bench`: speed against references measured in the same process (transformers, a bare
training loop, the machine's own bandwidth and matmul peak).
"""
