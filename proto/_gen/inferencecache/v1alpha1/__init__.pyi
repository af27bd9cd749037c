from . import inferencecache_pb2
from . import inferencecache_pb2_grpc
