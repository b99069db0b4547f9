//! SQL text for one target, built once when the target starts. Identifiers
//! come from the catalog and are always quoted; values are always bound.

use crate::target::{quote_ident, Target};

/// The statements used to page through, rewrite and checkpoint one target.
#[derive(Debug, Clone)]
pub struct Statements {
    /// Number of key columns; key values travel as text, one parameter each.
    pub key_len: usize,
    /// Keyset fetch, by which bounds are present and whether only changed
    /// rows are read; see `Statements::fetch`.
    fetch: [String; 8],
    /// Fetch in physical order, for a pass with `--scan-order physical`:
    /// rows after a position (`ctid`, exclusive) and before another, in
    /// position order, up to a limit. After the position comes whether the
    /// row's version is as new as a transaction ID (the pass's frontier) or
    /// newer, or from one of a list of transactions (those running when the
    /// pass started).
    pub physical_fetch: String,
    /// Every row whose key equals the given one, with the columns of a fetch.
    /// Keys repeat across an inheritance tree, whose primary key covers only
    /// the parent.
    pub key_group: String,
    /// Compare-and-swap update from arrays. Returns one row: the ordinals
    /// written, and those of rows that store another value than the one
    /// written. With `write_returns_each_row`, it returns one row for each
    /// row written instead: its ordinal and whether it stores that value.
    pub write: String,
    /// `write` for rows not in key order: it sorts them by key first.
    pub write_in_key_order: String,
    /// Whether `write` also takes the rows' positions (`ctid`), as its last array.
    pub by_position: bool,
    /// Whether `write` returns one row for each row written. PostgreSQL
    /// rejects an UPDATE inside a `WITH` query on a table with a rule on
    /// UPDATE, so such a table's write cannot gather its results.
    pub write_returns_each_row: bool,
    /// Reads every row between two positions, both included. Reading a page
    /// lets PostgreSQL prune the row versions on it that no transaction can
    /// see any more, which makes room for the next updates on that page.
    pub revisit: String,
    /// Locks rows by key and reads their current values and positions;
    /// returns ordinals.
    pub lock: String,
    /// Adds a batch's counts to a range's checkpoint and moves its position
    /// (unless the position is NULL), if this runner still holds the lease;
    /// returns the transaction's ID.
    pub checkpoint: String,
    /// Adds a sweep's counts, if this runner still holds the lease; returns
    /// the transaction's ID.
    pub sweep_checkpoint: String,
    /// Records rows needing attention.
    pub attention: String,
    /// Removes rows from the attention list once a sweep has rotated them.
    pub clear_attention: String,
    /// The largest key, which fixes the scan's upper bound.
    pub max_key: String,
    /// Row count of the table.
    pub count: String,
    /// Every `step`-th key in order, to split the key space into ranges.
    pub split_points: String,
}

impl Statements {
    pub fn new(target: &Target, schema: &str) -> Statements {
        let table = target.quoted_table();
        let column = target.quoted_column();
        let key_len = target.key.len();
        // Columns are qualified with the alias `t` everywhere: an unqualified name
        // in ORDER BY would bind to an output column such as `id::text AS id`.
        let key_names: Vec<String> = target
            .key
            .iter()
            .map(|k| format!("t.{}", quote_ident(&k.name)))
            .collect();
        let key_list = key_names.join(", ");
        let key_text = key_names
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k}::text AS k{}", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        let params = |first: usize| -> String {
            target
                .key
                .iter()
                .enumerate()
                .map(|(i, k)| format!("${}::{}", first + i, k.type_name))
                .collect::<Vec<_>>()
                .join(", ")
        };

        // Keyset fetch: the exclusive lower bound's parameters come first, then
        // the inclusive upper bound's, then the row limit, then for a sweep of
        // changed rows the horizon and the writers (see `ChangedSince`).
        // The row's position comes last, after the value; see `by_position`.
        let columns = format!("{key_text}, t.{column}::text AS value, t.ctid AS row_position");
        let select = format!("SELECT {columns} FROM {table} AS t");
        let order = format!("ORDER BY {key_list}");
        let fetch_variant = |has_lower: bool, has_upper: bool, changed: bool| -> String {
            let mut next = 1;
            let mut conditions = Vec::new();
            if has_lower {
                conditions.push(format!("({key_list}) > ({})", params(next)));
                next += key_len;
            }
            if has_upper {
                conditions.push(format!("({key_list}) <= ({})", params(next)));
                next += key_len;
            }
            let limit = next;
            if changed {
                // The row's version was written at or after the horizon, and
                // not by one of this run's own transactions.
                conditions.push(format!(
                    "age(t.xmin) <= age(${}::text::xid) AND NOT (t.xmin = ANY(${}::text[]::xid[]))",
                    limit + 1,
                    limit + 2
                ));
            }
            let filter = if conditions.is_empty() {
                String::new()
            } else {
                format!(" WHERE {}", conditions.join(" AND "))
            };
            format!("{select}{filter} {order} LIMIT ${limit}")
        };
        let fetch = std::array::from_fn(|i| fetch_variant(i & 1 != 0, i & 2 != 0, i & 4 != 0));
        let key_group = format!("{select} WHERE ({key_list}) = ({})", params(1));
        // `age()` compares IDs modulo 2^32. A frozen row keeps its original
        // `xmin`, which after 2^31 more transactions looks newer than the
        // frontier. The flag only leaves out rows under the new key, so it
        // never skips a row to rewrite; such a row may go uncounted.
        let physical_fetch = format!(
            "SELECT {columns}, (age(t.xmin) <= age($3::text::xid) OR t.xmin = ANY($5::text[]::xid[])) AS newer \
             FROM {table} AS t WHERE t.ctid > $1::tid AND t.ctid < $2::tid ORDER BY t.ctid LIMIT $4"
        );

        // Arrays: one text[] per key column, then old values, then new values,
        // then, in a single table, the rows' positions.
        let by_position = target.single_table;
        let array_columns: Vec<String> = (1..=key_len).map(|i| format!("k{i}")).collect();
        let array_count = key_len + 2 + usize::from(by_position);
        let arrays = (1..=array_count)
            .map(|i| match by_position && i == array_count {
                true => format!("${i}::tid[]"),
                false => format!("${i}::text[]"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let join_keys = target
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("t.{} = u.k{}::{}", quote_ident(&k.name), i + 1, k.type_name))
            .collect::<Vec<_>>()
            .join(" AND ");
        // The position lets PostgreSQL go straight to the row read, without an
        // index lookup. The key and old value must still match, so a row that
        // moved or changed since it was read is not written.
        let (position_column, position_join) = if by_position {
            (", row_position", "t.ctid = u.row_position AND ")
        } else {
            ("", "")
        };
        // COLLATE "C" makes the comparison byte-exact whatever the column's collation.
        let rows = format!(
            "unnest({arrays}) WITH ORDINALITY AS u({}, old_value, new_value{position_column}, ord)",
            array_columns.join(", ")
        );
        // Rows are written in the order given, and each write also inserts
        // the row's new version into the key's index. In key order those
        // inserts reach each index page once. In physical order they reach
        // pages at random, and the first change of a page after a
        // checkpoint writes the whole page to the WAL.
        let key_order = target
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("u.k{}::{}", i + 1, k.type_name))
            .collect::<Vec<_>>()
            .join(", ");
        // One row comes back for the whole batch, unless the table has a
        // rule on UPDATE. A row for each row written would cost the server
        // and this process a message each.
        let write_returns_each_row = target.update_rule;
        let write_from = |from: &str| {
            let update = format!(
                "UPDATE {table} AS t SET {column} = u.new_value FROM {from} \
                 WHERE {position_join}{join_keys} AND t.{column}::text COLLATE \"C\" = u.old_value COLLATE \"C\" \
                 RETURNING u.ord, t.{column}::text COLLATE \"C\" IS NOT DISTINCT FROM u.new_value COLLATE \"C\" AS stored"
            );
            match write_returns_each_row {
                true => update,
                false => format!(
                    "WITH w AS ({update}) SELECT coalesce(array_agg(ord), '{{}}'), \
                     coalesce(array_agg(ord) FILTER (WHERE NOT stored), '{{}}') FROM w"
                ),
            }
        };
        let write = write_from(&rows);
        let revisit = format!(
            "SELECT count(*) FROM {table} AS t WHERE t.ctid >= $1::tid AND t.ctid <= $2::tid"
        );
        let write_in_key_order =
            write_from(&format!("(SELECT * FROM {rows} ORDER BY {key_order}) AS u"));
        let lock_arrays = (1..=key_len)
            .map(|i| format!("${i}::text[]"))
            .collect::<Vec<_>>()
            .join(", ");
        let lock = format!(
            "SELECT u.ord, t.{column}::text, t.ctid FROM unnest({lock_arrays}) WITH ORDINALITY AS u({}, ord) \
             JOIN {table} AS t ON {join_keys} FOR UPDATE OF t",
            array_columns.join(", ")
        );

        let q = quote_ident(schema);
        let lease_check = format!(
            "EXISTS (SELECT 1 FROM {q}.leases l WHERE l.job = $1 AND l.shard = $4 AND l.holder = $5 AND l.expires_at > now())"
        );
        let checkpoint = format!(
            "UPDATE {q}.ranges SET last_key = COALESCE($6, last_key), rows_scanned = rows_scanned + $7, reencrypted = reencrypted + $8, \
             current = current + $9, null_values = null_values + $10, not_in_format = not_in_format + $11, \
             undecryptable = undecryptable + $12, ambiguous = ambiguous + $13, deleted = deleted + $14, \
             write_rejected = write_rejected + $15, conflicts = conflicts + $16, batches = batches + 1, \
             status = 'running', started_at = COALESCE(started_at, now()), updated_at = now() \
             WHERE job = $1 AND target = $2 AND range_index = $3 AND {lease_check} \
             RETURNING txid_current()"
        );
        let sweep_checkpoint = format!(
            "UPDATE {q}.ranges SET sweep_reencrypted = sweep_reencrypted + $6, conflicts = conflicts + $7, \
             updated_at = now() WHERE job = $1 AND target = $2 AND range_index = $3 AND {lease_check} \
             RETURNING txid_current()"
        );
        let attention = format!(
            "INSERT INTO {q}.attention (job, target, key, outcome) \
             SELECT $1, $2, k, o FROM unnest($3::text[], $4::text[]) AS u(k, o) \
             ON CONFLICT (job, target, key) DO UPDATE SET outcome = EXCLUDED.outcome, recorded_at = now()"
        );

        let clear_attention = format!(
            "DELETE FROM {q}.attention WHERE job = $1 AND target = $2 AND key = ANY($3::text[])"
        );

        let descending = key_names
            .iter()
            .map(|k| format!("{k} DESC"))
            .collect::<Vec<_>>()
            .join(", ");
        let max_key = format!("SELECT {key_text} FROM {table} AS t ORDER BY {descending} LIMIT 1");
        let count = format!("SELECT count(*) FROM {table}");
        let split_points = format!(
            "SELECT * FROM (SELECT {key_text}, row_number() OVER ({order}) AS position FROM {table} AS t \
             WHERE ({key_list}) <= ({})) s WHERE position % $ {} = 0",
            params(1),
            key_len + 1
        )
        .replace("$ ", "$");

        Statements {
            key_len,
            fetch,
            key_group,
            physical_fetch,
            write,
            write_in_key_order,
            by_position,
            write_returns_each_row,
            revisit,
            lock,
            checkpoint,
            sweep_checkpoint,
            attention,
            clear_attention,
            max_key,
            count,
            split_points,
        }
    }

    /// Returns the fetch statement for the bounds present, reading every row
    /// or only rows changed since a horizon.
    pub fn fetch(&self, has_lower: bool, has_upper: bool, changed: bool) -> &str {
        &self.fetch[usize::from(has_lower) + 2 * usize::from(has_upper) + 4 * usize::from(changed)]
    }
}

/// Returns a key's label (see `key_label`) for a terminal or a log line.
/// A label that could hide or forge lines is shown quoted and escaped. That
/// is an empty label, one that starts with a double quote, and one with a
/// character that `escape_debug` escapes, quotes and backslashes aside:
/// control characters, and invisible ones such as U+202E that reorder text.
/// NOTE: a one-column key whose text is a JSON array of strings still looks
/// like a composite key, and one with a comma like two keys in a list.
pub fn display_key(label: &str) -> String {
    let plain = !label.is_empty() && !label.starts_with('"') && !label.chars().any(could_forge);
    if plain {
        label.to_string()
    } else {
        format!("\"{}\"", label.escape_debug())
    }
}

/// Returns whether a character could hide or forge text on a terminal or in
/// a log line: a control character, or an invisible one such as U+202E
/// that reorders text. These are the characters `escape_debug` escapes,
/// quotes and backslashes aside.
pub fn could_forge(c: char) -> bool {
    !matches!(c, '"' | '\'' | '\\') && c.escape_debug().count() > 1
}

/// Formats a key for reports: a one-column key as its text, a composite key as a JSON array.
pub fn key_label(parts: &[String]) -> String {
    if parts.len() == 1 {
        parts[0].clone()
    } else {
        serde_json::to_string(parts).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_key_escapes_what_could_forge_lines() {
        assert_eq!(
            display_key("8f14e45f-ceea-467f-a8f4-2b1b1c1d1e1f"),
            "8f14e45f-ceea-467f-a8f4-2b1b1c1d1e1f"
        );
        assert_eq!(display_key("key 1 ü"), "key 1 ü");
        assert_eq!(display_key(r#"["1","n1"]"#), r#"["1","n1"]"#);
        assert_eq!(display_key(""), r#""""#);
        assert_eq!(
            display_key("fake\n  public.t.secret  999  ambiguous"),
            r#""fake\n  public.t.secret  999  ambiguous""#
        );
        assert_eq!(display_key("a\tb\u{1b}[31m"), r#""a\tb\u{1b}[31m""#);
        assert_eq!(display_key(r#""quoted""#), r#""\"quoted\"""#);
        assert_eq!(display_key("abc\u{202e}def"), r#""abc\u{202e}def""#);
        assert_eq!(display_key(r#"it's a\b "x""#), r#"it's a\b "x""#);
    }
}
