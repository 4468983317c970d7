//! `--max-query-depth` applied to the query text before the parser sees it.
//!
//! async-graphql checks the depth of a parsed document, but its parser recurses once per nesting
//! level first and answers a deep document with its own "recursion limit exceeded". A scan of the
//! text (one pass, no recursion) refuses it earlier, with the same message the depth check gives,
//! so a client sees one limit whatever the depth.

use std::sync::Arc;

use async_graphql::{
    extensions::{Extension, ExtensionContext, ExtensionFactory, NextParseQuery},
    parser::types::ExecutableDocument,
    ServerError, ServerResult, Variables,
};

/// The deepest nesting of `{`, `[` and `(` in a GraphQL document, outside strings and comments.
pub fn nesting(query: &str) -> usize {
    let bytes = query.as_bytes();
    let (mut depth, mut deepest, mut i) = (0usize, 0usize, 0usize);
    while i < bytes.len() {
        match bytes[i] {
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' && bytes[i] != b'\r' {
                    i += 1;
                }
            }
            b'"' if bytes[i..].starts_with(b"\"\"\"") => {
                i += 3;
                while i < bytes.len() && !bytes[i..].starts_with(b"\"\"\"") {
                    // An escaped triple quote stays inside the block string.
                    i += if bytes[i..].starts_with(b"\\\"\"\"") { 4 } else { 1 };
                }
                i += 2;
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'{' | b'[' | b'(' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' | b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    deepest
}

/// Refuses a document nested deeper than `max_depth` plus what arguments and lists may add, before
/// parsing it. Selection sets are one brace per level, so a document that passes here and is still
/// too deep is refused by the schema's own depth check, with the same message.
pub struct NestingLimit {
    pub max_depth: usize,
}

/// Nesting allowed beyond the selection depth: an argument list, and input objects and lists in it.
const ARGUMENT_NESTING: usize = 4;

impl ExtensionFactory for NestingLimit {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(NestingCheck { limit: self.max_depth + ARGUMENT_NESTING })
    }
}

struct NestingCheck {
    limit: usize,
}

#[async_trait::async_trait]
impl Extension for NestingCheck {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        if nesting(query) > self.limit {
            // async-graphql's own message for a document over `limit_depth`.
            return Err(ServerError::new("The query is nested too deep.", None));
        }
        next.run(ctx, query, variables).await
    }
}

#[cfg(test)]
mod tests {
    use super::nesting;

    #[test]
    fn nesting_counts_brackets_outside_strings_and_comments() {
        assert_eq!(nesting("{ a { b } c }"), 2);
        assert_eq!(nesting("query($x: [[Int]]) { a(x: {y: [1]}) }"), 4);
        assert_eq!(nesting(r#"{ a(s: "{{{{ \" {{") }"#), 2);
        assert_eq!(nesting("{ a # {{{{\n }"), 1);
        assert_eq!(nesting("{ a(s: \"\"\" {{{ \\\"\"\" {{ \"\"\") }"), 2);
        assert_eq!(nesting(&"{ a ".repeat(10_000)), 10_000);
        assert_eq!(nesting("}}}{"), 1, "unbalanced text does not underflow");
    }
}
