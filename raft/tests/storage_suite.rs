//! openraft's storage conformance suite, run against the RocksDB log store and the
//! snapshot-backed state machine.

use convoy_raft::{LogStore, StateMachineStore, StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = TempDir::new().expect("tempdir");
        let log = LogStore::open(&dir.path().join("log")).expect("open log store");
        let sm = StateMachineStore::open(&dir.path().join("sm")).expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("storage suite failed: {e}");
    }
}
