//! TimerDB's gRPC API (`timerdb.v1`): generated protobuf types, client and server.

/// The `timerdb.v1` package: messages, `TimerServiceClient`, `TimerServiceServer`.
pub mod v1 {
    tonic::include_proto!("timerdb.v1");
}

/// The `timerdb.internal.v1` package: node-to-node calls of a cluster (Raft messages,
/// lease renewals, forwarded commands). Not for clients.
pub mod internal {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("timerdb.internal.v1");
    }
}

/// The `timerdb.admin.v1` package: operating a cluster (`timerdb admin`).
pub mod admin {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("timerdb.admin.v1");
    }
}

/// Encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("timerdb_descriptor");
