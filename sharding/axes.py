"""Logical mesh axis names, in one place (tpu-inference style).

Every partition spec in ``sharding/`` names these constants, never strings.
"""

DATA = "data"  # data parallel: independent engine replicas (one device group each)
TENSOR = "tensor"  # tensor parallel: heads / intermediate / vocab split inside a replica
MESH_AXES = (DATA, TENSOR)  # the order of a mesh's axes (sharding/mesh.py)
