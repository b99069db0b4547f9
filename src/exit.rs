//! Process exit codes, shared by every command and documented in `--help`.

/// The job completed: every value readable under an old key now reads the same under the new key.
pub const SUCCESS: i32 = 0;
/// The job failed for a reason that may pass (database unreachable, retries
/// exhausted, lease lost). Running the same command again resumes it.
pub const RETRYABLE: i32 = 1;
/// Usage or configuration error (bad key, missing table, equal keys). Do not
/// retry before fixing the input; nothing was written.
pub const CONFIG: i32 = 2;
/// The job completed, but some rows need attention: undecryptable, ambiguous,
/// or rejected by the database. They were left unchanged and are listed.
/// Also when the last sweep still found values under an old key.
/// From `verify`: nothing is under an old key, but some values decrypt under
/// no key given.
pub const NEEDS_ATTENTION: i32 = 3;
/// Interrupted by SIGTERM or SIGINT after a clean checkpoint; safe to rerun.
pub const INTERRUPTED: i32 = 4;
/// `verify` found values still readable under an old key, or ambiguous ones.
pub const VERIFY_FAILED: i32 = 5;

/// The exit code table, as printed at the end of `--help`.
pub const HELP: &str = "Exit codes:
  0  complete
  1  failed, safe to retry (a rerun resumes from the last checkpoint)
  2  usage or configuration error; fix the input, do not retry
  3  complete, but some rows need attention (undecryptable, ambiguous, or rejected by the database),
     or the last sweep still found values under an old key;
     verify: nothing under an old key, but some values decrypt under no key given
  4  interrupted by a signal after a clean checkpoint; safe to retry
  5  verify: values are still readable under an old key, or ambiguous";
