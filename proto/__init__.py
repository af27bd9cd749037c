"""The InferenceCache gRPC contract (``proto/inferencecache/v1alpha1``).

Owner: the server (``inference-cache serve``) and every client of it. The stubs in
``_gen/`` are produced by ``make proto`` (grpcio-tools + protoletariat) and are never
edited by hand; ``make test`` fails when they drift from the ``.proto``.

Import the messages and service stubs from here::

    from inference_cache.proto import pb, pb_grpc
"""

from ._gen.inferencecache.v1alpha1 import inferencecache_pb2 as pb
from ._gen.inferencecache.v1alpha1 import inferencecache_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
