//! Whether a database error is worth retrying: classified from its type and SQLSTATE, never
//! from its message. A leaf: the store, the partition commands and the read side all use it.

/// Whether an error is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The database is unavailable, slow or overloaded: retry the same batch later.
    Transient,
    /// Something in the data is wrong: retrying the same rows fails again.
    Permanent,
}

/// Classifies a sqlx error as transient or permanent.
///
/// Only what the server says about the data is permanent: data exceptions and integrity
/// violations ([`classify_sqlstate`]). Everything else (I/O, TLS, pool, protocol, and any error
/// sqlx may add) is transient, so an unexpected error pauses the pipeline and never sends a
/// record to the dead-letter topic. A missing partition ([`is_partition_missing`]) is transient
/// too: it is infrastructure, recreated before the retry.
pub fn classify(err: &sqlx::Error) -> Retry {
    match err {
        sqlx::Error::Database(_) if is_partition_missing(err) => Retry::Transient,
        sqlx::Error::Database(db) => classify_sqlstate(db.code().as_deref().unwrap_or("")),
        _ => Retry::Transient,
    }
}

/// True for "no partition of relation ... found for row": SQLSTATE 23514 (check violation) with
/// no constraint name, which PostgreSQL raises when no attached partition covers a row. A
/// partition dropped or detached behind the sink's back, not a fault of the row.
pub fn is_partition_missing(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            db.code().as_deref() == Some("23514") && db.constraint().is_none()
        }
        _ => false,
    }
}

/// Classifies a SQLSTATE: connection trouble, shutdown, overload, lock and serialization
/// conflicts are transient; data exceptions and integrity violations are permanent.
pub fn classify_sqlstate(code: &str) -> Retry {
    match code {
        "57P01" | "57P02" | "57P03" | "53300" | "53200" | "53100" | "40001" | "40P01" | "55P03"
        | "57014" => Retry::Transient,
        _ if code.starts_with("08") => Retry::Transient,
        _ if code.starts_with("22") || code.starts_with("23") => Retry::Permanent,
        // Unknown classes (syntax, privileges, missing objects) will not fix themselves by
        // retrying the same statement, but they are not the record's fault either; treat as
        // transient so nothing is dead-lettered for an operator's mistake.
        _ => Retry::Transient,
    }
}

/// The SQLSTATE of a database error, when the server sent one.
pub fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|code| code.into_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_classify_by_class_not_text() {
        for transient in [
            "08000", "08006", "08P01", "57P01", "53300", "40001", "40P01", "55P03",
        ] {
            assert_eq!(
                classify_sqlstate(transient),
                Retry::Transient,
                "{transient}"
            );
        }
        for permanent in [
            "22001", "22P02", "22P05", "23502", "23514", "23503", "23505",
        ] {
            assert_eq!(
                classify_sqlstate(permanent),
                Retry::Permanent,
                "{permanent}"
            );
        }
    }

    #[test]
    fn pool_and_io_errors_are_transient() {
        assert_eq!(classify(&sqlx::Error::PoolTimedOut), Retry::Transient);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(classify(&sqlx::Error::Io(io)), Retry::Transient);
        assert_eq!(
            classify(&sqlx::Error::RowNotFound),
            Retry::Transient,
            "an unexpected error pauses, it never dead-letters"
        );
        assert_eq!(
            classify(&sqlx::Error::Configuration("odd".into())),
            Retry::Transient
        );
    }
}
