//! Where an upstream's credentials come from when it asks for them: the `config.json` itself,
//! or a Docker credential helper run as Docker runs it (`docker-credential-<name> get`, the
//! server URL on stdin, `{"ServerURL","Username","Secret"}` on stdout), so the ECR, GCR and
//! ACR helpers work unchanged.
//!
//! A helper is a child process: it runs under tokio's process driver (never blocking a
//! runtime thread), is killed when it outlives [`HELPER_TIMEOUT`], and may print at most
//! [`MAX_HELPER_OUTPUT`] bytes. Its answer is kept for [`HELPER_TTL`] in the one
//! [`Helpers`] cache every upstream shares, and concurrent askers for the same server wait
//! for one run, so a burst of pulls costs one helper run. Failures are not kept: the next
//! pull asks again. Neither the answer nor the helper's stdout/stderr (which may echo
//! secrets) is ever logged or put in an error; errors name the helper and the registry.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use shoal_shared::docker_config::{helper_not_found, parse_helper_output, Auth, Helper, Source};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::OnceCell;

/// Longest a helper may run (cloud helpers call their provider's token API).
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes read from a helper's stdout (and its stderr).
pub const MAX_HELPER_OUTPUT: u64 = 64 << 10;
/// How long a helper's answer is reused.
pub const HELPER_TTL: Duration = Duration::from_secs(300);
/// Most answers kept (one per helper and registry).
const MAX_ANSWERS: u64 = 1024;

/// Why a credential helper gave no credentials. Never carries what the helper printed.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("credential helper {program} for {host}: not found in the helper path")]
    NotFound { program: String, host: String },
    #[error("credential helper {program} for {host} could not be run: {cause}")]
    Spawn { program: String, host: String, cause: std::io::Error },
    #[error("credential helper {program} for {host} failed ({status})")]
    Failed { program: String, host: String, status: std::process::ExitStatus },
    #[error("credential helper {program} for {host} did not answer within {secs}s")]
    Timeout { program: String, host: String, secs: u64 },
    #[error("credential helper {program} for {host} printed more than {limit} bytes")]
    TooLarge { program: String, host: String, limit: u64 },
    #[error("credential helper {program} for {host} answered something that is not credentials: {cause}")]
    Malformed { program: String, host: String, cause: shoal_shared::docker_config::ConfigError },
}

impl HelperError {
    /// Worth asking again later (and a reason to serve a cached tag meanwhile): the helper
    /// ran but failed or hung, as cloud helpers do when their token API is down.
    pub fn transient(&self) -> bool {
        matches!(self, Self::Failed { .. } | Self::Timeout { .. })
    }
}

/// Runs credential helpers and keeps their answers for [`HELPER_TTL`].
pub struct Helpers {
    /// Directories searched for helpers, in `PATH` syntax; `None`: the origin's `PATH`.
    path: Option<OsString>,
    timeout: Duration,
    answers: moka::sync::Cache<Helper, Arc<OnceCell<Option<Auth>>>>,
}

impl std::fmt::Debug for Helpers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Helpers")
            .field("path", &self.path)
            .field("answers", &self.answers.entry_count())
            .finish()
    }
}

impl Helpers {
    pub fn new(path: Option<OsString>) -> Self {
        Self::with_timeout(path, HELPER_TIMEOUT)
    }

    fn with_timeout(path: Option<OsString>, timeout: Duration) -> Self {
        Self {
            path,
            timeout,
            answers: moka::sync::Cache::builder().max_capacity(MAX_ANSWERS).time_to_live(HELPER_TTL).build(),
        }
    }

    /// The helper's credentials for its server (`None`: it holds none), from the cache or
    /// from one run shared by everyone asking meanwhile.
    pub async fn get(&self, helper: &Helper) -> Result<Option<Auth>, HelperError> {
        let cell = self.answers.get_with_by_ref(helper, || Arc::new(OnceCell::new()));
        cell.get_or_try_init(|| self.run(helper)).await.cloned()
    }

    /// The helper's executable: the first `program` file in the helper path.
    fn locate(&self, program: &str) -> Option<PathBuf> {
        let path = self.path.clone().or_else(|| std::env::var_os("PATH"))?;
        std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
    }

    async fn run(&self, helper: &Helper) -> Result<Option<Auth>, HelperError> {
        let (program, host) = (helper.program.clone(), helper.server_url.clone());
        let exe = self
            .locate(&helper.program)
            .ok_or_else(|| HelperError::NotFound { program: program.clone(), host: host.clone() })?;
        let spawn_err = |cause| HelperError::Spawn { program: program.clone(), host: host.clone(), cause };
        let mut child = tokio::process::Command::new(exe)
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(spawn_err(std::io::Error::other("no pipes to the helper")));
        };
        let server_url = helper.server_url.clone();
        let talk = async move {
            // A helper that exits without reading its stdin is answered by its exit status.
            let _ = stdin.write_all(server_url.as_bytes()).await;
            drop(stdin);
            let (out, _err, status) = tokio::try_join!(bounded(stdout), bounded(stderr), child.wait())?;
            Ok::<_, std::io::Error>((out, status))
        };
        let (out, status) = match tokio::time::timeout(self.timeout, talk).await {
            // Dropping `talk` drops the child, which kills it.
            Err(_) => {
                return Err(HelperError::Timeout { program, host, secs: self.timeout.as_secs() });
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::FileTooLarge => {
                return Err(HelperError::TooLarge { program, host, limit: MAX_HELPER_OUTPUT });
            }
            Ok(Err(e)) => return Err(spawn_err(e)),
            Ok(Ok(done)) => done,
        };
        if !status.success() {
            // Docker's rule: a helper that holds nothing for the server says so on stdout.
            if helper_not_found(&out) {
                return Ok(None);
            }
            return Err(HelperError::Failed { program, host, status });
        }
        parse_helper_output(&out).map_err(|cause| HelperError::Malformed { program, host, cause })
    }
}

/// Reads all of `r`, failing with `FileTooLarge` past [`MAX_HELPER_OUTPUT`].
async fn bounded(r: impl AsyncRead + Unpin) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    r.take(MAX_HELPER_OUTPUT + 1).read_to_end(&mut buf).await?;
    if buf.len() as u64 > MAX_HELPER_OUTPUT {
        return Err(std::io::Error::new(std::io::ErrorKind::FileTooLarge, "helper output too large"));
    }
    Ok(buf)
}

/// One upstream's credentials: written in the config, or asked of a helper when needed.
#[derive(Debug, Clone)]
pub enum Keychain {
    Stored(Auth),
    Helper { helper: Helper, helpers: Arc<Helpers> },
}

impl Keychain {
    pub fn new(source: Source, helpers: &Arc<Helpers>) -> Self {
        match source {
            Source::Stored(auth) => Self::Stored(auth),
            Source::Helper(helper) => Self::Helper { helper, helpers: helpers.clone() },
        }
    }

    /// The credentials now (`None`: none are held, the request goes anonymously).
    pub async fn get(&self) -> Result<Option<Auth>, HelperError> {
        match self {
            Self::Stored(auth) => Ok(Some(auth.clone())),
            Self::Helper { helper, helpers } => helpers.get(helper).await,
        }
    }
}

#[cfg(test)]
mod tests;
