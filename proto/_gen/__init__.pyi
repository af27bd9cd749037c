from . import inferencecache
