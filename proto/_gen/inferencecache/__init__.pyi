from . import v1alpha1
