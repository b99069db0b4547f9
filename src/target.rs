//! Targets: parsing `[schema.]table.column`, and resolving a target against the
//! catalog into the table, column and ordering key used for keyset paging.

use std::fmt;

use sqlx::PgConnection;

/// Column types a target may have. Values are compared and written as text.
const TEXT_TYPES: [&str; 2] = ["text", "character varying"];

/// A problem with a target that the user must fix; never retried.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("invalid target {spec:?}: {reason}")]
    Syntax { spec: String, reason: String },
    #[error("table {0} not found")]
    TableNotFound(String),
    #[error("column {column} not found in table {table}")]
    ColumnNotFound { table: String, column: String },
    #[error("column {column} of table {table} has type {type_name}; only text and varchar columns can hold encrypted values")]
    NotText {
        table: String,
        column: String,
        type_name: String,
    },
    #[error("table {0} has no primary key; add one, or name a unique key with --unique-key {0}=COLUMN[,COLUMN]")]
    NoPrimaryKey(String),
    #[error("--unique-key {table}={columns}: {reason}")]
    BadUniqueKey {
        table: String,
        columns: String,
        reason: String,
    },
    #[error(
        "column {column} is part of the key of table {table}; a key column cannot be rewritten"
    )]
    KeyColumnTarget { table: String, column: String },
    #[error("column {column} of table {table} is a generated column; its value is computed by the database and cannot be rewritten")]
    Generated { table: String, column: String },
    #[error("{0} is a {1}, not a table")]
    NotATable(String, &'static str),
    #[error("table {0} has row-level security that applies to this role, so some rows would be invisible and never rotated; connect as a role with BYPASSRLS, a superuser, or the table's owner when the policy is not forced")]
    RowSecurity(String),
    #[error("table {0} has a DO INSTEAD rule on UPDATE, so an UPDATE of the table does not write its rows; rotate the table the rule writes to")]
    InsteadRule(String),
}

/// Quotes an identifier for SQL, doubling embedded double quotes.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A dotted name as typed by the user, split into identifiers. Unquoted parts
/// are folded to lower case as PostgreSQL does; quoted parts are kept exactly.
pub fn parse_dotted(spec: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut chars = spec.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err("unterminated double quote".into()),
                }
            }
            if part.is_empty() {
                return Err("empty quoted identifier".into());
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if !(c.is_alphanumeric() || c == '_' || c == '$') {
                    return Err(format!(
                        "unexpected character {c:?}; put identifiers with spaces or punctuation in double quotes"
                    ));
                }
                part.push(c);
                chars.next();
            }
            if part.is_empty() {
                return Err("empty identifier".into());
            }
            if part.starts_with(|c: char| c.is_ascii_digit() || c == '$') {
                return Err(format!(
                    "identifier {part:?} must not start with a digit or '$'"
                ));
            }
            part = part.to_lowercase();
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => continue,
            Some(c) => return Err(format!("unexpected character {c:?} after an identifier")),
        }
    }
}

/// Splits a comma-separated list of targets, leaving commas inside double
/// quotes alone (`"odd, name".c` is one target).
pub fn split_target_list(list: &str) -> Vec<String> {
    split_unquoted(list, ',')
}

/// Splits `text` at each `separator` outside double quotes.
fn split_unquoted(text: &str, separator: char) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            c if c == separator && !quoted => items.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    items.push(current);
    items
}

/// A target as given on the command line, before the catalog is consulted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    pub schema: Option<String>,
    pub table: String,
    pub column: String,
}

impl TargetSpec {
    pub fn parse(spec: &str) -> Result<TargetSpec, TargetError> {
        let syntax = |reason: String| TargetError::Syntax {
            spec: spec.to_string(),
            reason,
        };
        let mut parts = parse_dotted(spec).map_err(syntax)?;
        match parts.len() {
            2 => {
                let column = parts.pop().unwrap();
                let table = parts.pop().unwrap();
                Ok(TargetSpec {
                    schema: None,
                    table,
                    column,
                })
            }
            3 => {
                let column = parts.pop().unwrap();
                let table = parts.pop().unwrap();
                let schema = parts.pop();
                Ok(TargetSpec {
                    schema,
                    table,
                    column,
                })
            }
            n => Err(syntax(format!(
                "expected [schema.]table.column, got {n} part(s)"
            ))),
        }
    }

    /// The table part as a quoted SQL name.
    pub fn quoted_table(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&self.table)),
            None => quote_ident(&self.table),
        }
    }
}

/// A `--unique-key TABLE=COL[,COL]` option: the ordering key for a table
/// without a primary key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueKeySpec {
    pub schema: Option<String>,
    pub table: String,
    pub columns: Vec<String>,
}

impl UniqueKeySpec {
    pub fn parse(spec: &str) -> Result<UniqueKeySpec, String> {
        // Quoted names may contain '=' and ','.
        let [table, columns]: [String; 2] = split_unquoted(spec, '=').try_into().map_err(|_| {
            format!("invalid --unique-key {spec:?}: expected [schema.]table=column[,column]")
        })?;
        let mut table_parts =
            parse_dotted(&table).map_err(|e| format!("invalid --unique-key {spec:?}: {e}"))?;
        if table_parts.is_empty() || table_parts.len() > 2 {
            return Err(format!(
                "invalid --unique-key {spec:?}: expected [schema.]table before '='"
            ));
        }
        let table = table_parts.pop().unwrap();
        let schema = table_parts.pop();
        let columns = split_unquoted(&columns, ',')
            .iter()
            .map(|c| {
                parse_dotted(c).and_then(|p| {
                    if p.len() == 1 {
                        Ok(p[0].clone())
                    } else {
                        Err("a key column cannot be dotted".into())
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("invalid --unique-key {spec:?}: {e}"))?;
        Ok(UniqueKeySpec {
            schema,
            table,
            columns,
        })
    }
}

/// One column of the ordering key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyColumn {
    pub name: String,
    /// The type as `format_type` prints it, used to cast text parameters back.
    pub type_name: String,
}

/// A target resolved against the catalog.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Target {
    pub schema: String,
    pub table: String,
    pub column: String,
    pub key: Vec<KeyColumn>,
    /// The index used for paging: the primary key or the named unique index.
    pub index_name: String,
    /// The planner's estimate of the table's rows (`reltuples`), or 0 if never analyzed.
    pub estimated_rows: i64,
    /// A plain table with no partitions or inheritance children, whose rows a
    /// write can find by their `ctid`.
    pub single_table: bool,
    /// The table has a DO INSTEAD rule on UPDATE.
    pub instead_rule: bool,
    /// The table has a rule on UPDATE of any kind. PostgreSQL rejects an
    /// UPDATE of such a table inside a `WITH` query.
    #[serde(skip)]
    pub update_rule: bool,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}",
            display_ident(&self.schema),
            display_ident(&self.table),
            display_ident(&self.column)
        )
    }
}

/// Shows an identifier bare when it has only lower-case letters, digits and
/// underscores, and quoted otherwise, so that `--target` reads it back
/// unchanged. Target labels are made of it and name targets in a job's
/// identity and checkpoints, so this rule must not change.
/// NOTE: a keyword such as `order` stays bare, which SQL would not read as
/// a name.
pub fn display_ident(name: &str) -> String {
    let plain = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_');
    if plain {
        name.to_string()
    } else {
        quote_ident(name)
    }
}

impl Target {
    /// The label used for this target in checkpoints, metrics and reports.
    pub fn label(&self) -> String {
        self.to_string()
    }

    pub fn quoted_table(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }

    pub fn quoted_column(&self) -> String {
        quote_ident(&self.column)
    }

    /// Resolves a target: table, column type, and ordering key.
    pub async fn resolve(
        conn: &mut PgConnection,
        spec: &TargetSpec,
        unique_keys: &[UniqueKeySpec],
    ) -> Result<Target, ResolveError> {
        let display = match &spec.schema {
            Some(schema) => format!("{}.{}", display_ident(schema), display_ident(&spec.table)),
            None => display_ident(&spec.table),
        };

        // Table: to_regclass applies the search path when no schema is given.
        // `relhassubclass` stays set after the last child is dropped, until
        // the next VACUUM or ANALYZE, so children are looked up instead.
        let table_row: Option<(i64, String, String, String, f32, bool)> = sqlx::query_as(
            "SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relkind::text, c.reltuples, \
                    EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass($1)",
        )
        .bind(spec.quoted_table())
        .fetch_optional(&mut *conn)
        .await?;
        let Some((oid, schema, table, kind, reltuples, has_children)) = table_row else {
            return Err(TargetError::TableNotFound(display).into());
        };
        match kind.as_str() {
            "r" | "p" => {}
            "v" => return Err(TargetError::NotATable(display, "view").into()),
            "m" => return Err(TargetError::NotATable(display, "materialized view").into()),
            "f" => return Err(TargetError::NotATable(display, "foreign table").into()),
            _ => return Err(TargetError::NotATable(display, "relation of another kind").into()),
        }

        // Rows hidden by row-level security would be skipped silently.
        let row_security: bool = sqlx::query_scalar("SELECT row_security_active($1::oid)")
            .bind(oid)
            .fetch_one(&mut *conn)
            .await?;
        if row_security {
            return Err(TargetError::RowSecurity(display).into());
        }

        // An UPDATE rewritten into other statements by a DO INSTEAD rule
        // would not write the rows read; `run` rejects such a target.
        let (instead_rule, update_rule): (bool, bool) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM pg_rewrite WHERE ev_class = $1::oid AND ev_type = '2' AND is_instead), \
                    EXISTS (SELECT 1 FROM pg_rewrite WHERE ev_class = $1::oid AND ev_type = '2')",
        )
        .bind(oid)
        .fetch_one(&mut *conn)
        .await?;

        // Column and its type; a domain counts as the type it is based on.
        // The declared type is kept for the error message.
        let column_type: Option<(String, String)> = sqlx::query_as(
            "WITH RECURSIVE base AS ( \
               SELECT a.atttypid AS oid FROM pg_attribute a \
               WHERE a.attrelid = $1::oid AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
               UNION ALL \
               SELECT t.typbasetype FROM pg_type t JOIN base ON t.oid = base.oid WHERE t.typtype = 'd' \
             ) \
             SELECT format_type(base.oid, NULL), \
                    (SELECT format_type(a.atttypid, NULL) FROM pg_attribute a \
                     WHERE a.attrelid = $1::oid AND a.attname = $2) \
             FROM base JOIN pg_type t ON t.oid = base.oid \
             WHERE t.typtype <> 'd'",
        )
        .bind(oid)
        .bind(&spec.column)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((type_name, declared_type)) = column_type else {
            return Err(TargetError::ColumnNotFound {
                table: display,
                column: spec.column.clone(),
            }
            .into());
        };
        if !TEXT_TYPES.contains(&type_name.as_str()) {
            let type_name = if declared_type == type_name {
                type_name
            } else {
                format!("{declared_type} (a domain over {type_name})")
            };
            return Err(TargetError::NotText {
                table: display,
                column: spec.column.clone(),
                type_name,
            }
            .into());
        }
        let generated: bool = sqlx::query_scalar(
            "SELECT attgenerated <> '' FROM pg_attribute WHERE attrelid = $1::oid AND attname = $2",
        )
        .bind(oid)
        .bind(&spec.column)
        .fetch_one(&mut *conn)
        .await?;
        if generated {
            return Err(TargetError::Generated {
                table: display,
                column: spec.column.clone(),
            }
            .into());
        }

        // Ordering key: the primary key, or a unique key named by the user.
        let unique_key = unique_keys
            .iter()
            .find(|u| u.table == table && u.schema.as_deref().is_none_or(|s| s == schema));
        let (index_name, key) = match unique_key {
            Some(unique) => resolve_unique_key(conn, oid, &display, unique).await?,
            None => resolve_primary_key(conn, oid, &display).await?,
        };
        if key.iter().any(|k| k.name == spec.column) {
            return Err(TargetError::KeyColumnTarget {
                table: display,
                column: spec.column.clone(),
            }
            .into());
        }

        let estimated_rows = if reltuples >= 0.0 {
            reltuples as i64
        } else {
            let quoted = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
            estimate_unanalyzed(conn, oid, &quoted).await?
        };
        Ok(Target {
            schema,
            table,
            column: spec.column.clone(),
            key,
            index_name,
            estimated_rows,
            single_table: kind == "r" && !has_children,
            instead_rule,
            update_rule,
        })
    }
}

/// Tables up to this size that were never analyzed are counted exactly.
const EXACT_COUNT_MAX_BYTES: i64 = 64 * 1024 * 1024;

/// Bytes per row assumed for a larger table that was never analyzed.
/// NOTE: a guess for short encrypted values; wider rows make progress overestimate.
const ASSUMED_ROW_BYTES: i64 = 128;

/// Estimates the rows of a table that was never analyzed (`reltuples` is
/// -1), for progress: counted when small, else from its size on disk.
async fn estimate_unanalyzed(
    conn: &mut PgConnection,
    oid: i64,
    quoted_table: &str,
) -> Result<i64, sqlx::Error> {
    let bytes: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(pg_relation_size(relid)), 0)::int8 FROM pg_partition_tree($1::oid)",
    )
    .bind(oid)
    .fetch_one(&mut *conn)
    .await?;
    if bytes <= EXACT_COUNT_MAX_BYTES {
        return sqlx::query_scalar(&format!("SELECT count(*) FROM {quoted_table}"))
            .fetch_one(&mut *conn)
            .await;
    }
    Ok(bytes / ASSUMED_ROW_BYTES)
}

/// Resolution failed: either the user's input is wrong or the database failed.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Columns of an index in index order, with their types.
async fn index_columns(
    conn: &mut PgConnection,
    index_oid: i64,
) -> Result<Vec<KeyColumn>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
         FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position) \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
         WHERE i.indexrelid = $1::oid ORDER BY k.position",
    )
    .bind(index_oid)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, type_name)| KeyColumn { name, type_name })
        .collect())
}

async fn resolve_primary_key(
    conn: &mut PgConnection,
    table_oid: i64,
    display: &str,
) -> Result<(String, Vec<KeyColumn>), ResolveError> {
    let index: Option<(i64, String)> = sqlx::query_as(
        "SELECT i.indexrelid::int8, c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = $1::oid AND i.indisprimary",
    )
    .bind(table_oid)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((index_oid, index_name)) = index else {
        return Err(TargetError::NoPrimaryKey(display.to_string()).into());
    };
    Ok((index_name, index_columns(conn, index_oid).await?))
}

async fn resolve_unique_key(
    conn: &mut PgConnection,
    table_oid: i64,
    display: &str,
    unique: &UniqueKeySpec,
) -> Result<(String, Vec<KeyColumn>), ResolveError> {
    let bad = |reason: String| TargetError::BadUniqueKey {
        table: display.to_string(),
        columns: unique.columns.join(","),
        reason,
    };

    // The key columns must exist and be NOT NULL, or keyset paging would skip rows.
    for column in &unique.columns {
        let not_null: Option<(bool,)> = sqlx::query_as(
            "SELECT a.attnotnull FROM pg_attribute a \
             WHERE a.attrelid = $1::oid AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind(table_oid)
        .bind(column)
        .fetch_optional(&mut *conn)
        .await?;
        match not_null {
            None => return Err(bad(format!("column {column} not found")).into()),
            Some((false,)) => {
                return Err(bad(format!(
                    "column {column} allows NULL; a paging key must be NOT NULL"
                ))
                .into())
            }
            Some((true,)) => {}
        }
    }

    // A valid, non-partial unique index on exactly these columns, in this order.
    let indexes: Vec<(i64, String)> = sqlx::query_as(
        "SELECT i.indexrelid::int8, c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = $1::oid AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL",
    )
    .bind(table_oid)
    .fetch_all(&mut *conn)
    .await?;
    for (index_oid, index_name) in indexes {
        let columns = index_columns(conn, index_oid).await?;
        if columns.iter().map(|c| &c.name).eq(unique.columns.iter()) {
            return Ok((index_name, columns));
        }
    }
    Err(bad("no valid unique index on exactly these columns, in this order".into()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_keep_keywords_bare() {
        // Labels are part of a job's identity: they must not change.
        let target = Target {
            schema: "public".into(),
            table: "order".into(),
            column: "Check".into(),
            key: Vec::new(),
            index_name: String::new(),
            estimated_rows: 0,
            single_table: true,
            instead_rule: false,
            update_rule: false,
        };
        assert_eq!(target.label(), r#"public.order."Check""#);
    }

    #[test]
    fn target_parses_quoted_parts() {
        let spec = TargetSpec::parse(r#"acc."Webhook Configs"."Signing Secret""#).unwrap();
        assert_eq!(spec.schema.as_deref(), Some("acc"));
        assert_eq!(spec.table, "Webhook Configs");
        assert_eq!(spec.column, "Signing Secret");
    }

    #[test]
    fn target_folds_unquoted_parts() {
        let spec = TargetSpec::parse("Credentials.Client_Secret").unwrap();
        assert_eq!(spec.schema, None);
        assert_eq!(spec.table, "credentials");
        assert_eq!(spec.column, "client_secret");
    }

    #[test]
    fn target_keeps_doubled_quotes() {
        let spec = TargetSpec::parse(r#""a""b".c"#).unwrap();
        assert_eq!(spec.table, "a\"b");
        assert_eq!(spec.quoted_table(), r#""a""b""#);
    }

    #[test]
    fn target_rejects_bad_syntax() {
        for bad in [
            "table",
            "a.b.c.d",
            "t.c; DROP TABLE t",
            "t.\"c",
            "t..c",
            "t.\"\"",
            "",
            "1t.c",
        ] {
            assert!(TargetSpec::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn target_list_keeps_quoted_commas() {
        assert_eq!(
            split_target_list(r#"a.b,"odd, name"."se,cret",c.d"#),
            vec![
                "a.b".to_string(),
                r#""odd, name"."se,cret""#.to_string(),
                "c.d".to_string()
            ]
        );
    }

    #[test]
    fn unique_key_parses() {
        let spec = UniqueKeySpec::parse("app.t=a,\"B c\"").unwrap();
        assert_eq!(spec.schema.as_deref(), Some("app"));
        assert_eq!(spec.table, "t");
        assert_eq!(spec.columns, vec!["a".to_string(), "B c".to_string()]);

        // Quoted names keep their commas and equals signs.
        let spec = UniqueKeySpec::parse(r#""Web, hooks=1"=tenant,"Hook, Id""#).unwrap();
        assert_eq!(spec.table, "Web, hooks=1");
        assert_eq!(
            spec.columns,
            vec!["tenant".to_string(), "Hook, Id".to_string()]
        );
        assert!(UniqueKeySpec::parse("t=a=b").is_err());
        assert!(UniqueKeySpec::parse("t").is_err());
    }
}
