//! TimerDB's gRPC API (`timerdb.v1`): generated protobuf types, client and server.

/// The `timerdb.v1` package: messages, `TimerServiceClient`, `TimerServiceServer`.
pub mod v1 {
    tonic::include_proto!("timerdb.v1");
}

/// Encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("timerdb_descriptor");
