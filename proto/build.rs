//! Generates the tonic/prost code for the public API (`proto/timerdb/v1`) and the
//! node-to-node one (`proto/timerdb/internal/v1`) with a vendored `protoc`,
//! so that building needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("timerdb_descriptor.bin"))
        // Payloads, keys and header values stay `Bytes` so they move through the server
        // without copies.
        .bytes(".timerdb.v1")
        .compile_with_config(
            config,
            &[
                "proto/timerdb/v1/timerdb.proto",
                "proto/timerdb/internal/v1/internal.proto",
                "proto/timerdb/admin/v1/admin.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
