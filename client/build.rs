//! Bakes the git revision and the compiler version into the binary, for `--version` and
//! `telemeter_client_build_info` (the script is shared with the other binary).

include!("../common/build_revision.rs");
