//! The EXEC rules: which programs a task from the network may run. One check, used at submit
//! (validation) and again just before each run (the program executor).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// How EXEC tasks that come from the network are allowed to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ExecPolicy {
    /// Neither `--exec_dir` nor `--exec_any`: refused.
    Disabled,
    /// Only programs directly inside this directory.
    Dir(PathBuf),
    /// Any program on PATH (`--exec_any`).
    Any,
}

/// Why a program may not run: EXEC is disabled, or the name is refused under `--exec_dir`.
#[derive(Debug)]
pub(crate) enum ProgramError {
    /// Neither `--exec_dir` nor `--exec_any` is set and the task is not trusted.
    Disabled,
    /// The name holds a NUL byte.
    Nul,
    /// The name holds a `/`: only files directly in the directory may run.
    Slash,
    /// The name holds `..`.
    DotDot,
    /// Nothing by that name in the directory (or a link to nothing).
    NotFound(String),
    /// The name, links resolved, is a file outside the directory.
    Outside(String),
    /// The name, links resolved, is not a regular file (e.g. a directory).
    NotAFile(String),
    /// The exec directory itself cannot be resolved.
    Dir(io::Error),
    /// The name cannot be resolved for another reason (e.g. a loop of links).
    Resolve(String, io::Error),
}

impl fmt::Display for ProgramError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProgramError::Disabled => write!(f, "EXEC from the network is disabled"),
            ProgramError::Nul => write!(f, "EXEC program names must not contain a NUL byte"),
            ProgramError::Slash => write!(
                f,
                "EXEC program names must not contain '/' (programs run from --exec_dir)"
            ),
            ProgramError::DotDot => write!(f, "EXEC program names must not contain '..'"),
            ProgramError::NotFound(n) => {
                write!(f, "program {n:?} not found in the exec directory")
            }
            ProgramError::Outside(n) => write!(
                f,
                "program {n:?} leads outside the exec directory (its real path, links resolved, must be inside it)"
            ),
            ProgramError::NotAFile(n) => write!(f, "program {n:?} is not a regular file"),
            ProgramError::Dir(e) => write!(f, "the exec directory cannot be resolved: {e}"),
            ProgramError::Resolve(n, e) => write!(f, "program {n:?} cannot be resolved: {e}"),
        }
    }
}

impl std::error::Error for ProgramError {}

/// The real path (symlinks resolved) of program `name` in the exec directory `dir`, refused
/// unless it is a regular file inside the real path of `dir`. Checked at submit and again just
/// before each run, since a link may change in between.
pub(crate) fn resolve_in_dir(dir: &Path, name: &str) -> Result<PathBuf, ProgramError> {
    if name.contains('\0') {
        return Err(ProgramError::Nul);
    }
    if name.contains('/') {
        return Err(ProgramError::Slash);
    }
    if name.contains("..") {
        return Err(ProgramError::DotDot);
    }
    let dir = dir.canonicalize().map_err(ProgramError::Dir)?;
    let real = match dir.join(name).canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ProgramError::NotFound(name.to_string()))
        }
        Err(e) => return Err(ProgramError::Resolve(name.to_string(), e)),
    };
    if !real.starts_with(&dir) || real == dir {
        return Err(ProgramError::Outside(name.to_string()));
    }
    if !real.is_file() {
        return Err(ProgramError::NotAFile(name.to_string()));
    }
    Ok(real)
}
