"""Generated protocol buffer code."""
from google.protobuf import descriptor as _descriptor
from google.protobuf import descriptor_pool as _descriptor_pool
from google.protobuf import runtime_version as _runtime_version
from google.protobuf import symbol_database as _symbol_database
from google.protobuf.internal import builder as _builder
_runtime_version.ValidateProtobufRuntimeVersion(_runtime_version.Domain.PUBLIC, 7, 35, 1, '', 'inferencecache/v1alpha1/inferencecache.proto')
_sym_db = _symbol_database.Default()
DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(b'\n,inferencecache/v1alpha1/inferencecache.proto\x12\x17inferencecache.v1alpha1"\xd6\x01\n\x15RenderTemplateRequest\x12\x14\n\x0ctemplate_ref\x18\x01 \x01(\t\x12P\n\tvariables\x18\x02 \x03(\x0b2=.inferencecache.v1alpha1.RenderTemplateRequest.VariablesEntry\x12\x11\n\ttenant_id\x18\x03 \x01(\t\x12\x10\n\x08model_id\x18\x04 \x01(\t\x1a0\n\x0eVariablesEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12\r\n\x05value\x18\x02 \x01(\t:\x028\x01"\xd0\x01\n\x16RenderTemplateResponse\x12\x17\n\x0frendered_prompt\x18\x01 \x01(\x0c\x12\x1a\n\x12stable_prefix_hash\x18\x02 \x01(\x0c\x12\x18\n\x10tenant_namespace\x18\x03 \x01(\x0c\x12\x13\n\x0breason_code\x18\x04 \x01(\t\x12\x19\n\x11template_revision\x18\x05 \x01(\t\x12\x1b\n\x13stable_block_hashes\x18\x06 \x03(\x0c\x12\x1a\n\x12stable_token_count\x18\x07 \x01(\x05"&\n\x03SLO\x12\x0f\n\x07ttft_ms\x18\x01 \x01(\x05\x12\x0e\n\x06tbt_ms\x18\x02 \x01(\x05"\x98\x02\n\x12LookupRouteRequest\x12\x10\n\x08model_id\x18\x01 \x01(\t\x12\x11\n\ttenant_id\x18\x02 \x01(\t\x12\x13\n\x0bprefix_hash\x18\x03 \x01(\x0c\x12\x1a\n\x12prefix_token_count\x18\x04 \x01(\x05\x12\x13\n\x0bhash_scheme\x18\x05 \x01(\t\x12)\n\x03slo\x18\x06 \x01(\x0b2\x1c.inferencecache.v1alpha1.SLO\x12\x14\n\x0cblock_hashes\x18\x07 \x03(\x0c\x12\x1a\n\x12block_token_counts\x18\x08 \x03(\x05\x12\x11\n\ttoken_ids\x18\t \x03(\r\x12\x13\n\x0bprompt_text\x18\n \x01(\t\x12\x12\n\nadapter_id\x18\x0b \x01(\t"q\n\x0cReplicaScore\x12\x12\n\nreplica_id\x18\x01 \x01(\t\x12\r\n\x05score\x18\x02 \x01(\x02\x12\x16\n\x0ematched_tokens\x18\x03 \x01(\x05\x12 \n\x18estimated_cache_hit_prob\x18\x04 \x01(\x02J\x04\x08\x05\x10\x06"\xab\x01\n\x13LookupRouteResponse\x12=\n\x0ereplica_scores\x18\x01 \x03(\x0b2%.inferencecache.v1alpha1.ReplicaScore\x12\x13\n\x0breason_code\x18\x02 \x01(\t\x12\x19\n\x11lookup_latency_us\x18\x03 \x01(\x03\x12\x11\n\ttoken_ids\x18\x04 \x03(\r\x12\x12\n\nadapter_id\x18\x05 \x01(\t"\x85\x01\n\x14LookupPDRouteRequest\x12\x10\n\x08model_id\x18\x01 \x01(\t\x12\x11\n\ttenant_id\x18\x02 \x01(\t\x12\x13\n\x0bprefix_hash\x18\x03 \x01(\x0c\x12\x1a\n\x12prefix_token_count\x18\x04 \x01(\x05\x12\x17\n\x0fpd_topology_ref\x18\x05 \x01(\t"{\n\x15LookupPDRouteResponse\x12\x1a\n\x12prefill_replica_id\x18\x01 \x01(\t\x12\x19\n\x11decode_replica_id\x18\x02 \x01(\t\x12\x16\n\x0etransport_hint\x18\x03 \x01(\t\x12\x13\n\x0breason_code\x18\x04 \x01(\t"\x83\x01\n\x0bPrefixEntry\x12\x13\n\x0bprefix_hash\x18\x01 \x01(\x0c\x12\x13\n\x0btoken_count\x18\x02 \x01(\x05\x12\x14\n\x0cblock_hashes\x18\x03 \x03(\x0c\x12\x1a\n\x12block_token_counts\x18\x04 \x03(\x05\x12\x12\n\nadapter_id\x18\x06 \x01(\tJ\x04\x08\x05\x10\x06"t\n\x0cReplicaStats\x12\x12\n\nreplica_id\x18\x01 \x01(\t\x12\x1a\n\x12cache_memory_bytes\x18\x02 \x01(\x03\x12\x10\n\x08hit_rate\x18\x03 \x01(\x02\x12\x10\n\x08pressure\x18\x04 \x01(\x02J\x04\x08\x05\x10\x06J\x04\x08\x06\x10\x07J\x04\x08\x07\x10\x08"\xf8\x01\n\x10CacheStateUpdate\x12\x12\n\nreplica_id\x18\x01 \x01(\t\x12\x10\n\x08model_id\x18\x02 \x01(\t\x12\x11\n\ttenant_id\x18\x03 \x01(\t\x12\x13\n\x0bhash_scheme\x18\x04 \x01(\t\x12\x14\n\x0ctimestamp_us\x18\x05 \x01(\x03\x126\n\x08prefixes\x18\x06 \x03(\x0b2$.inferencecache.v1alpha1.PrefixEntry\x124\n\x05stats\x18\x07 \x01(\x0b2%.inferencecache.v1alpha1.ReplicaStats\x12\x12\n\nadapter_id\x18\x08 \x01(\t"<\n\x0cCacheSummary\x12\x16\n\x0etotal_prefixes\x18\x01 \x01(\x03\x12\x14\n\x0chot_prefixes\x18\x02 \x01(\x03";\n\x14GetCacheStateRequest\x12\x10\n\x08model_id\x18\x01 \x01(\t\x12\x11\n\ttenant_id\x18\x02 \x01(\t"\x88\x01\n\x15GetCacheStateResponse\x127\n\x08replicas\x18\x01 \x03(\x0b2%.inferencecache.v1alpha1.ReplicaStats\x126\n\x07summary\x18\x02 \x01(\x0b2%.inferencecache.v1alpha1.CacheSummary"\xa6\x02\n\nCacheEvent\x126\n\x04type\x18\x01 \x01(\x0e2(.inferencecache.v1alpha1.CacheEvent.Type\x12\x12\n\nreplica_id\x18\x02 \x01(\t\x12\x10\n\x08model_id\x18\x03 \x01(\t\x12\x11\n\ttenant_id\x18\x04 \x01(\t\x12\x13\n\x0bprefix_hash\x18\x05 \x01(\x0c\x12\x14\n\x0ctimestamp_us\x18\x06 \x01(\x03\x12\x12\n\nadapter_id\x18\x07 \x01(\t"h\n\x04Type\x12\x14\n\x10TYPE_UNSPECIFIED\x10\x00\x12\x10\n\x0cPREFIX_ADDED\x10\x01\x12\x12\n\x0ePREFIX_EVICTED\x10\x02\x12\x13\n\x0fREPLICA_UPDATED\x10\x03\x12\x0f\n\x0bALL_CLEARED\x10\x04"s\n\x13StreamEventsRequest\x12\x10\n\x08model_id\x18\x01 \x01(\t\x12\x11\n\ttenant_id\x18\x02 \x01(\t\x127\n\x05types\x18\x03 \x03(\x0e2(.inferencecache.v1alpha1.CacheEvent.Type"%\n\x14StreamMetricsRequest\x12\r\n\x05names\x18\x01 \x03(\t"\xb5\x01\n\x06Metric\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x0c\n\x04type\x18\x02 \x01(\t\x12;\n\x06labels\x18\x03 \x03(\x0b2+.inferencecache.v1alpha1.Metric.LabelsEntry\x12\r\n\x05value\x18\x04 \x01(\x01\x12\x14\n\x0ctimestamp_us\x18\x05 \x01(\x03\x1a-\n\x0bLabelsEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12\r\n\x05value\x18\x02 \x01(\t:\x028\x01",\n\x03Ack\x12\x10\n\x08accepted\x18\x01 \x01(\x08\x12\x13\n\x0breason_code\x18\x02 \x01(\t2\xcc\x06\n\x0eInferenceCache\x12q\n\x0eRenderTemplate\x12..inferencecache.v1alpha1.RenderTemplateRequest\x1a/.inferencecache.v1alpha1.RenderTemplateResponse\x12h\n\x0bLookupRoute\x12+.inferencecache.v1alpha1.LookupRouteRequest\x1a,.inferencecache.v1alpha1.LookupRouteResponse\x12n\n\rLookupPDRoute\x12-.inferencecache.v1alpha1.LookupPDRouteRequest\x1a..inferencecache.v1alpha1.LookupPDRouteResponse\x12n\n\rGetCacheState\x12-.inferencecache.v1alpha1.GetCacheStateRequest\x1a..inferencecache.v1alpha1.GetCacheStateResponse\x12]\n\x10ReportCacheState\x12).inferencecache.v1alpha1.CacheStateUpdate\x1a\x1c.inferencecache.v1alpha1.Ack(\x01\x12Q\n\x0cPublishEvent\x12#.inferencecache.v1alpha1.CacheEvent\x1a\x1c.inferencecache.v1alpha1.Ack\x12h\n\x11StreamCacheEvents\x12,.inferencecache.v1alpha1.StreamEventsRequest\x1a#.inferencecache.v1alpha1.CacheEvent0\x01\x12a\n\rStreamMetrics\x12-.inferencecache.v1alpha1.StreamMetricsRequest\x1a\x1f.inferencecache.v1alpha1.Metric0\x01BoZmgithub.com/cachebox-project/inference-cache/pkg/server/proto/inferencecache/v1alpha1;inferencecachev1alpha1pbb\x06proto3')
_globals = globals()
_builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, _globals)
_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'inferencecache.v1alpha1.inferencecache_pb2', _globals)
if not _descriptor._USE_C_DESCRIPTORS:
    _globals['DESCRIPTOR']._loaded_options = None
    _globals['DESCRIPTOR']._serialized_options = b'Zmgithub.com/cachebox-project/inference-cache/pkg/server/proto/inferencecache/v1alpha1;inferencecachev1alpha1pb'
    _globals['_RENDERTEMPLATEREQUEST_VARIABLESENTRY']._loaded_options = None
    _globals['_RENDERTEMPLATEREQUEST_VARIABLESENTRY']._serialized_options = b'8\x01'
    _globals['_METRIC_LABELSENTRY']._loaded_options = None
    _globals['_METRIC_LABELSENTRY']._serialized_options = b'8\x01'
    _globals['_RENDERTEMPLATEREQUEST']._serialized_start = 74
    _globals['_RENDERTEMPLATEREQUEST']._serialized_end = 288
    _globals['_RENDERTEMPLATEREQUEST_VARIABLESENTRY']._serialized_start = 240
    _globals['_RENDERTEMPLATEREQUEST_VARIABLESENTRY']._serialized_end = 288
    _globals['_RENDERTEMPLATERESPONSE']._serialized_start = 291
    _globals['_RENDERTEMPLATERESPONSE']._serialized_end = 499
    _globals['_SLO']._serialized_start = 501
    _globals['_SLO']._serialized_end = 539
    _globals['_LOOKUPROUTEREQUEST']._serialized_start = 542
    _globals['_LOOKUPROUTEREQUEST']._serialized_end = 822
    _globals['_REPLICASCORE']._serialized_start = 824
    _globals['_REPLICASCORE']._serialized_end = 937
    _globals['_LOOKUPROUTERESPONSE']._serialized_start = 940
    _globals['_LOOKUPROUTERESPONSE']._serialized_end = 1111
    _globals['_LOOKUPPDROUTEREQUEST']._serialized_start = 1114
    _globals['_LOOKUPPDROUTEREQUEST']._serialized_end = 1247
    _globals['_LOOKUPPDROUTERESPONSE']._serialized_start = 1249
    _globals['_LOOKUPPDROUTERESPONSE']._serialized_end = 1372
    _globals['_PREFIXENTRY']._serialized_start = 1375
    _globals['_PREFIXENTRY']._serialized_end = 1506
    _globals['_REPLICASTATS']._serialized_start = 1508
    _globals['_REPLICASTATS']._serialized_end = 1624
    _globals['_CACHESTATEUPDATE']._serialized_start = 1627
    _globals['_CACHESTATEUPDATE']._serialized_end = 1875
    _globals['_CACHESUMMARY']._serialized_start = 1877
    _globals['_CACHESUMMARY']._serialized_end = 1937
    _globals['_GETCACHESTATEREQUEST']._serialized_start = 1939
    _globals['_GETCACHESTATEREQUEST']._serialized_end = 1998
    _globals['_GETCACHESTATERESPONSE']._serialized_start = 2001
    _globals['_GETCACHESTATERESPONSE']._serialized_end = 2137
    _globals['_CACHEEVENT']._serialized_start = 2140
    _globals['_CACHEEVENT']._serialized_end = 2434
    _globals['_CACHEEVENT_TYPE']._serialized_start = 2330
    _globals['_CACHEEVENT_TYPE']._serialized_end = 2434
    _globals['_STREAMEVENTSREQUEST']._serialized_start = 2436
    _globals['_STREAMEVENTSREQUEST']._serialized_end = 2551
    _globals['_STREAMMETRICSREQUEST']._serialized_start = 2553
    _globals['_STREAMMETRICSREQUEST']._serialized_end = 2590
    _globals['_METRIC']._serialized_start = 2593
    _globals['_METRIC']._serialized_end = 2774
    _globals['_METRIC_LABELSENTRY']._serialized_start = 2729
    _globals['_METRIC_LABELSENTRY']._serialized_end = 2774
    _globals['_ACK']._serialized_start = 2776
    _globals['_ACK']._serialized_end = 2820
    _globals['_INFERENCECACHE']._serialized_start = 2823
    _globals['_INFERENCECACHE']._serialized_end = 3667