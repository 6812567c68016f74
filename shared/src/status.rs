//! The status pages every component serves: plain HTML built on the server, no script, a
//! refresh every few seconds. Read-only views of state the component already holds.

use std::fmt::Write as _;

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Bytes as people read them (`1.5 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A status page under construction.
#[derive(Debug)]
pub struct Page {
    html: String,
}

impl Page {
    /// A page titled `title` (e.g. "shoal-agent 10.0.0.5:5051").
    pub fn new(title: &str) -> Self {
        let title = escape(title);
        let mut html = String::new();
        let _ = write!(
            html,
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta http-equiv=\"refresh\" content=\"5\"><title>{title}</title><style>\
             body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}}\
             table{{border-collapse:collapse;margin-bottom:1.5em}}\
             th,td{{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-variant-numeric:tabular-nums}}\
             th{{background:#f2f2f2}} code{{font-size:.9em}} .bar{{background:#e8e8e8;width:12em}}\
             .bar div{{background:#3a7;height:.8em}}</style></head><body><h1>{title}</h1>"
        );
        Self { html }
    }

    /// A line of key facts.
    pub fn facts(&mut self, facts: &[(&str, String)]) -> &mut Self {
        self.html.push_str("<p>");
        for (i, (k, v)) in facts.iter().enumerate() {
            if i > 0 {
                self.html.push_str(" &middot; ");
            }
            let _ = write!(self.html, "<b>{}</b>: {}", escape(k), escape(v));
        }
        self.html.push_str("</p>");
        self
    }

    /// A section with a table; `empty` is shown instead when there are no rows. Cells are
    /// text (escaped); a cell starting with `\u{1}` followed by a fraction from 0 to 1 is
    /// drawn as a progress bar.
    pub fn table(&mut self, heading: &str, columns: &[&str], rows: &[Vec<String>], empty: &str) -> &mut Self {
        let _ = write!(self.html, "<h2>{}</h2>", escape(heading));
        if rows.is_empty() {
            let _ = write!(self.html, "<p><i>{}</i></p>", escape(empty));
            return self;
        }
        self.html.push_str("<table><thead><tr>");
        for c in columns {
            let _ = write!(self.html, "<th>{}</th>", escape(c));
        }
        self.html.push_str("</tr></thead><tbody>");
        for row in rows {
            self.html.push_str("<tr>");
            for cell in row {
                match cell.strip_prefix('\u{1}').and_then(|f| f.parse::<f64>().ok()) {
                    Some(f) => {
                        let pct = (f.clamp(0.0, 1.0) * 100.0).round();
                        let _ = write!(
                            self.html,
                            "<td><div class=\"bar\"><div style=\"width:{pct}%\"></div></div>{pct}%</td>"
                        );
                    }
                    None => {
                        let _ = write!(self.html, "<td>{}</td>", escape(cell));
                    }
                }
            }
            self.html.push_str("</tr>");
        }
        self.html.push_str("</tbody></table>");
        self
    }

    /// A progress bar cell for [`table`](Self::table).
    pub fn bar(fraction: f64) -> String {
        format!("\u{1}{fraction}")
    }

    /// The finished page as a response.
    pub fn response(&mut self) -> actix_web::HttpResponse {
        self.html.push_str("<p><a href=\"/metrics\">metrics</a> &middot; <a href=\"/readyz\">readiness</a></p></body></html>");
        actix_web::HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .insert_header(("Cache-Control", "no-store"))
            .body(std::mem::take(&mut self.html))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_bars_drawn() {
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        let mut page = Page::new("t<");
        page.table("h", &["a", "b"], &[vec!["<script>".into(), Page::bar(0.5)]], "none");
        let html = String::from_utf8(
            actix_web::body::to_bytes(page.response().into_body())
                .now_or_never()
                .expect("ready")
                .expect("body")
                .to_vec(),
        )
        .expect("utf8");
        assert!(html.contains("&lt;script&gt;") && !html.contains("<script>"));
        assert!(html.contains("width:50%"));
        assert!(html.contains("<title>t&lt;</title>"));
    }

    use futures_util::FutureExt as _;
}
