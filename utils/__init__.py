import os

# The phases run torch on CPU cores that several processes share. OpenMP threads that spin while they
# wait for work then steal each other's time: measured here with 2 threads under load, training ran
# 3-4x slower than with 1 thread, and 1.5x faster than 1 thread once waiting passively (evaluation
# passes 7x faster). The policy is read when torch loads its OpenMP runtime, so it is set on the first
# import of this package, before any phase imports torch; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
