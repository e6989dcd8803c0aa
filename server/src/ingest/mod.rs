//! Ingest: everything an upload goes through from `/upload` to the store, one file per step.
//!
//! The pipeline, in the order an upload meets it:
//!
//! 1. [`upload`]: the HTTP mapping. Method, upload token (checked on the head, before the body is
//!    read), then every refusal as a status and a one-line reason.
//! 2. [`ratelimit`]: admission before the body costs anything (the cluster's slot or one of its
//!    refusals), and the slot reserved once the upload is known to be stored.
//!    An upload marked as a backfill (sent late, from a client's spool) is admitted by
//!    [`backfill`] instead: its own bounded budget.
//! 3. [`gate`]: the memory an upload reserves (from the length its snappy frames declare) and the
//!    CPU units its decoding takes, so a burst of uploads holds bounded memory and cores.
//! 4. [`decode`]: Content-Encoding and Content-Type, caps before and after decompression, counts
//!    taken from the wire before anything is built, then the fast wire check or a full decode.
//! 5. [`validate`]: the checks and the stamping of the token's labels.
//! 6. [`placement`]: where the upload is stored (here, or on its owner in a cluster), and THE one
//!    place that stores an upload and then queues it for remote write.

pub mod backfill;
pub mod decode;
pub mod gate;
pub mod placement;
pub mod ratelimit;
pub mod upload;
pub mod validate;
