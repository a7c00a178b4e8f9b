"""Generated protobuf bindings for the Caffe-compatible schema in proto/caffe.proto."""
