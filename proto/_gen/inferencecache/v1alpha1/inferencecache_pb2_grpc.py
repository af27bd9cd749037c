"""Client and server classes corresponding to protobuf-defined services."""
import grpc
import warnings
from ...inferencecache.v1alpha1 import inferencecache_pb2 as inferencecache_dot_v1alpha1_dot_inferencecache__pb2
GRPC_GENERATED_VERSION = '1.85.1'
GRPC_VERSION = grpc.__version__
_version_not_supported = False
try:
    from grpc._utilities import first_version_is_lower
    _version_not_supported = first_version_is_lower(GRPC_VERSION, GRPC_GENERATED_VERSION)
except ImportError:
    _version_not_supported = True
if _version_not_supported:
    raise RuntimeError(f'The grpc package installed is at version {GRPC_VERSION},' + ' but the generated code in inferencecache/v1alpha1/inferencecache_pb2_grpc.py depends on' + f' grpcio>={GRPC_GENERATED_VERSION}.' + f' Please upgrade your grpc module to grpcio>={GRPC_GENERATED_VERSION}' + f' or downgrade your generated code using grpcio-tools<={GRPC_VERSION}.')

class InferenceCacheStub:
    """Missing associated documentation comment in .proto file."""

    def __init__(self, channel):
        """Constructor.

        Args:
            channel: A grpc.Channel.
        """
        self.RenderTemplate = channel.unary_unary('/inferencecache.v1alpha1.InferenceCache/RenderTemplate', request_serializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.RenderTemplateRequest.SerializeToString, response_deserializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.RenderTemplateResponse.FromString, _registered_method=True)
        self.LookupRoute = channel.unary_unary('/inferencecache.v1alpha1.InferenceCache/LookupRoute', request_serializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.LookupRouteRequest.SerializeToString, response_deserializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.LookupRouteResponse.FromString, _registered_method=True)
        self.LookupPDRoute = channel.unary_unary('/inferencecache.v1alpha1.InferenceCache/LookupPDRoute', request_serializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.LookupPDRouteRequest.SerializeToString, response_deserializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.LookupPDRouteResponse.FromString, _registered_method=True)
        self.GetCacheState = channel.unary_unary('/inferencecache.v1alpha1.InferenceCache/GetCacheState', request_serializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.GetCacheStateRequest.SerializeToString, response_deserializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.GetCacheStateResponse.FromString, _registered_method=True)
        self.ReportCacheState = channel.stream_unary('/inferencecache.v1alpha1.InferenceCache/ReportCacheState', request_serializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.CacheStateUpdate.SerializeToString, response_deserializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.Ack.FromString, _registered_method=True)
        self.PublishEvent = channel.unary_unary('/inferencecache.v1alpha1.InferenceCache/PublishEvent', request_serializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.CacheEvent.SerializeToString, response_deserializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.Ack.FromString, _registered_method=True)
        self.StreamCacheEvents = channel.unary_stream('/inferencecache.v1alpha1.InferenceCache/StreamCacheEvents', request_serializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.StreamEventsRequest.SerializeToString, response_deserializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.CacheEvent.FromString, _registered_method=True)
        self.StreamMetrics = channel.unary_stream('/inferencecache.v1alpha1.InferenceCache/StreamMetrics', request_serializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.StreamMetricsRequest.SerializeToString, response_deserializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.Metric.FromString, _registered_method=True)

class InferenceCacheServicer:
    """Missing associated documentation comment in .proto file."""

    def RenderTemplate(self, request, context):
        """Renders a PromptTemplate (text, or the JSON of the chat messages) and keys
        its stable prefix for model_id. See docs/templates.md.
        """
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details('Method not implemented!')
        raise NotImplementedError('Method not implemented!')

    def LookupRoute(self, request, context):
        """Ranks the replicas of a model for a prompt (hashes, token ids or text).
        """
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details('Method not implemented!')
        raise NotImplementedError('Method not implemented!')

    def LookupPDRoute(self, request, context):
        """Prefill/decode routing: out of scope for now, always NO_HINT.
        """
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details('Method not implemented!')
        raise NotImplementedError('Method not implemented!')

    def GetCacheState(self, request, context):
        """Missing associated documentation comment in .proto file."""
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details('Method not implemented!')
        raise NotImplementedError('Method not implemented!')

    def ReportCacheState(self, request_iterator, context):
        """Producer RPCs (may be served only on --producer-bind-address).
        """
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details('Method not implemented!')
        raise NotImplementedError('Method not implemented!')

    def PublishEvent(self, request, context):
        """Missing associated documentation comment in .proto file."""
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details('Method not implemented!')
        raise NotImplementedError('Method not implemented!')

    def StreamCacheEvents(self, request, context):
        """Missing associated documentation comment in .proto file."""
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details('Method not implemented!')
        raise NotImplementedError('Method not implemented!')

    def StreamMetrics(self, request, context):
        """Missing associated documentation comment in .proto file."""
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details('Method not implemented!')
        raise NotImplementedError('Method not implemented!')

def add_InferenceCacheServicer_to_server(servicer, server):
    rpc_method_handlers = {'RenderTemplate': grpc.unary_unary_rpc_method_handler(servicer.RenderTemplate, request_deserializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.RenderTemplateRequest.FromString, response_serializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.RenderTemplateResponse.SerializeToString), 'LookupRoute': grpc.unary_unary_rpc_method_handler(servicer.LookupRoute, request_deserializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.LookupRouteRequest.FromString, response_serializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.LookupRouteResponse.SerializeToString), 'LookupPDRoute': grpc.unary_unary_rpc_method_handler(servicer.LookupPDRoute, request_deserializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.LookupPDRouteRequest.FromString, response_serializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.LookupPDRouteResponse.SerializeToString), 'GetCacheState': grpc.unary_unary_rpc_method_handler(servicer.GetCacheState, request_deserializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.GetCacheStateRequest.FromString, response_serializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.GetCacheStateResponse.SerializeToString), 'ReportCacheState': grpc.stream_unary_rpc_method_handler(servicer.ReportCacheState, request_deserializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.CacheStateUpdate.FromString, response_serializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.Ack.SerializeToString), 'PublishEvent': grpc.unary_unary_rpc_method_handler(servicer.PublishEvent, request_deserializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.CacheEvent.FromString, response_serializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.Ack.SerializeToString), 'StreamCacheEvents': grpc.unary_stream_rpc_method_handler(servicer.StreamCacheEvents, request_deserializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.StreamEventsRequest.FromString, response_serializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.CacheEvent.SerializeToString), 'StreamMetrics': grpc.unary_stream_rpc_method_handler(servicer.StreamMetrics, request_deserializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.StreamMetricsRequest.FromString, response_serializer=inferencecache_dot_v1alpha1_dot_inferencecache__pb2.Metric.SerializeToString)}
    generic_handler = grpc.method_handlers_generic_handler('inferencecache.v1alpha1.InferenceCache', rpc_method_handlers)
    server.add_generic_rpc_handlers((generic_handler,))
    server.add_registered_method_handlers('inferencecache.v1alpha1.InferenceCache', rpc_method_handlers)

class InferenceCache:
    """Missing associated documentation comment in .proto file."""

    @staticmethod
    def RenderTemplate(request, target, options=(), channel_credentials=None, call_credentials=None, insecure=False, compression=None, wait_for_ready=None, timeout=None, metadata=None):
        return grpc.experimental.unary_unary(request, target, '/inferencecache.v1alpha1.InferenceCache/RenderTemplate', inferencecache_dot_v1alpha1_dot_inferencecache__pb2.RenderTemplateRequest.SerializeToString, inferencecache_dot_v1alpha1_dot_inferencecache__pb2.RenderTemplateResponse.FromString, options, channel_credentials, insecure, call_credentials, compression, wait_for_ready, timeout, metadata, _registered_method=True)

    @staticmethod
    def LookupRoute(request, target, options=(), channel_credentials=None, call_credentials=None, insecure=False, compression=None, wait_for_ready=None, timeout=None, metadata=None):
        return grpc.experimental.unary_unary(request, target, '/inferencecache.v1alpha1.InferenceCache/LookupRoute', inferencecache_dot_v1alpha1_dot_inferencecache__pb2.LookupRouteRequest.SerializeToString, inferencecache_dot_v1alpha1_dot_inferencecache__pb2.LookupRouteResponse.FromString, options, channel_credentials, insecure, call_credentials, compression, wait_for_ready, timeout, metadata, _registered_method=True)

    @staticmethod
    def LookupPDRoute(request, target, options=(), channel_credentials=None, call_credentials=None, insecure=False, compression=None, wait_for_ready=None, timeout=None, metadata=None):
        return grpc.experimental.unary_unary(request, target, '/inferencecache.v1alpha1.InferenceCache/LookupPDRoute', inferencecache_dot_v1alpha1_dot_inferencecache__pb2.LookupPDRouteRequest.SerializeToString, inferencecache_dot_v1alpha1_dot_inferencecache__pb2.LookupPDRouteResponse.FromString, options, channel_credentials, insecure, call_credentials, compression, wait_for_ready, timeout, metadata, _registered_method=True)

    @staticmethod
    def GetCacheState(request, target, options=(), channel_credentials=None, call_credentials=None, insecure=False, compression=None, wait_for_ready=None, timeout=None, metadata=None):
        return grpc.experimental.unary_unary(request, target, '/inferencecache.v1alpha1.InferenceCache/GetCacheState', inferencecache_dot_v1alpha1_dot_inferencecache__pb2.GetCacheStateRequest.SerializeToString, inferencecache_dot_v1alpha1_dot_inferencecache__pb2.GetCacheStateResponse.FromString, options, channel_credentials, insecure, call_credentials, compression, wait_for_ready, timeout, metadata, _registered_method=True)

    @staticmethod
    def ReportCacheState(request_iterator, target, options=(), channel_credentials=None, call_credentials=None, insecure=False, compression=None, wait_for_ready=None, timeout=None, metadata=None):
        return grpc.experimental.stream_unary(request_iterator, target, '/inferencecache.v1alpha1.InferenceCache/ReportCacheState', inferencecache_dot_v1alpha1_dot_inferencecache__pb2.CacheStateUpdate.SerializeToString, inferencecache_dot_v1alpha1_dot_inferencecache__pb2.Ack.FromString, options, channel_credentials, insecure, call_credentials, compression, wait_for_ready, timeout, metadata, _registered_method=True)

    @staticmethod
    def PublishEvent(request, target, options=(), channel_credentials=None, call_credentials=None, insecure=False, compression=None, wait_for_ready=None, timeout=None, metadata=None):
        return grpc.experimental.unary_unary(request, target, '/inferencecache.v1alpha1.InferenceCache/PublishEvent', inferencecache_dot_v1alpha1_dot_inferencecache__pb2.CacheEvent.SerializeToString, inferencecache_dot_v1alpha1_dot_inferencecache__pb2.Ack.FromString, options, channel_credentials, insecure, call_credentials, compression, wait_for_ready, timeout, metadata, _registered_method=True)

    @staticmethod
    def StreamCacheEvents(request, target, options=(), channel_credentials=None, call_credentials=None, insecure=False, compression=None, wait_for_ready=None, timeout=None, metadata=None):
        return grpc.experimental.unary_stream(request, target, '/inferencecache.v1alpha1.InferenceCache/StreamCacheEvents', inferencecache_dot_v1alpha1_dot_inferencecache__pb2.StreamEventsRequest.SerializeToString, inferencecache_dot_v1alpha1_dot_inferencecache__pb2.CacheEvent.FromString, options, channel_credentials, insecure, call_credentials, compression, wait_for_ready, timeout, metadata, _registered_method=True)

    @staticmethod
    def StreamMetrics(request, target, options=(), channel_credentials=None, call_credentials=None, insecure=False, compression=None, wait_for_ready=None, timeout=None, metadata=None):
        return grpc.experimental.unary_stream(request, target, '/inferencecache.v1alpha1.InferenceCache/StreamMetrics', inferencecache_dot_v1alpha1_dot_inferencecache__pb2.StreamMetricsRequest.SerializeToString, inferencecache_dot_v1alpha1_dot_inferencecache__pb2.Metric.FromString, options, channel_credentials, insecure, call_credentials, compression, wait_for_ready, timeout, metadata, _registered_method=True)