"""Model loading (real and tiny folders through the same code) and the tiny random-model builders.

Heavy: imported only by stage executors, tests and benchmarks.
"""
