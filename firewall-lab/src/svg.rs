//! The demo's timeline as an SVG: one row per ordered pair of nodes, red
//! where its probes were lost.

use std::collections::BTreeMap;

use crate::replay::Replay;

/// The `<svg>` tag for `panels` panels of `w` by `ph` (plus margins).
pub(crate) fn open(w: f64, left: f64, ph: f64, top: f64, panels: usize) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="12">"#,
        w + left + 20.0,
        panels as f64 * (ph + top + 40.0) + 20.0
    )
}

/// A panel's axes at (`left`, `top`), `w` by `ph`: value grid lines at
/// `yticks` (of `ymax`), and a time label every 10 s up to `tmax_ms`.
pub(crate) fn axes(
    left: f64,
    w: f64,
    top: f64,
    ph: f64,
    yticks: &[f64],
    ymax: f64,
    tmax_ms: f64,
) -> String {
    let base = top + ph;
    let mut s = format!(
        r#"<line x1="{left}" y1="{base}" x2="{}" y2="{base}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="black"/>"#,
        left + w
    );
    for v in yticks {
        let y = base - v / ymax * ph;
        s += &format!(
            r##"<text x="{}" y="{}" text-anchor="end">{v}</text><line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
            left - 5.0,
            y + 4.0,
            left + w
        );
    }
    let mut x_t = 0.0;
    while x_t <= tmax_ms / 1000.0 {
        let x = left + x_t * 1000.0 / tmax_ms * w;
        s += &format!(
            r#"<text x="{x}" y="{}" text-anchor="middle">{x_t:.0}s</text>"#,
            base + 15.0
        );
        x_t += 10.0;
    }
    s
}

/// Delivered packets per second into each live node, one panel per mode,
/// with the discovery events marked. Plain SVG, written by hand: a few
/// polylines do not need a plotting library.
pub(crate) fn timeline_svg(runs: &[Replay]) -> String {
    let (w, ph, left, top) = (900.0, 220.0, 60.0, 30.0);
    let colors = [("n2", "#d62728"), ("n3", "#1f77b4"), ("n4", "#2ca02c")];
    let tmax = runs
        .iter()
        .flat_map(|r| r.log.iter().map(|e| e.0))
        .max()
        .unwrap_or(1) as f64;
    let mut s = open(w, left, ph, top, runs.len());
    for (i, r) in runs.iter().enumerate() {
        let y0 = 20.0 + i as f64 * (ph + top + 40.0);
        s += &format!(
            r#"<text x="{left}" y="{}" font-weight="bold">{}: packets/s delivered into each live node from the other live nodes</text>"#,
            y0 + 12.0,
            r.mode
        );
        let base = y0 + top + ph;
        // 2 peers x 50 pps = 100 pps expected per node.
        let ymax = 120.0;
        s += &axes(left, w, y0 + top, ph, &[0.0, 50.0, 100.0], ymax, tmax);
        for (k, (name, color)) in colors.iter().enumerate() {
            let k = k as u8 + 2;
            let mut buckets: BTreeMap<u64, u64> = BTreeMap::new();
            for (t, src, dst, recv) in &r.log {
                if *recv && *dst == k && [2, 3, 4].contains(src) {
                    *buckets.entry(t / 500).or_default() += 1;
                }
            }
            // Only up to this run's own end: runs differ in length.
            let nb = r.log.iter().map(|e| e.0).max().unwrap_or(0) / 500;
            let pts: Vec<String> = (0..nb)
                .map(|b| {
                    let pps = buckets.get(&b).copied().unwrap_or(0) as f64 * 2.0;
                    format!(
                        "{:.1},{:.1}",
                        left + (b as f64 * 500.0) / tmax * w,
                        base - pps.min(ymax) / ymax * ph
                    )
                })
                .collect();
            s += &format!(
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                pts.join(" ")
            );
            s += &format!(
                r#"<text x="{}" y="{}" fill="{color}">{name}</text>"#,
                left + w - 120.0 + k as f64 * 30.0,
                y0 + 12.0
            );
        }
        for (j, (t, e)) in r.events.iter().enumerate() {
            let x = left + *t as f64 / tmax * w;
            // Labels right of the line, or left of it near the right edge.
            let (tx, anchor) = if x > left + 0.7 * w {
                (x - 3.0, "end")
            } else {
                (x + 3.0, "start")
            };
            let label = e
                .replace('&', "and")
                .replace('<', "")
                .replace('\'', "&apos;");
            s += &format!(
                r##"<line x1="{x}" y1="{}" x2="{x}" y2="{base}" stroke="#888" stroke-dasharray="4,3"/><text x="{tx}" y="{}" fill="#555" text-anchor="{anchor}">{label}</text>"##,
                y0 + top,
                y0 + top + 14.0 + j as f64 * 14.0
            );
        }
    }
    s += "</svg>\n";
    s
}
