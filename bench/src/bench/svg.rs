//! A plain SVG chart: one panel per metric, one bar per contender (the
//! median), a whisker for the min–max spread, and the value on the bar.
//! Each panel has its own scale starting at zero.

use std::fmt::Write as _;

use super::goals::absolute_target;
use super::machine::Machine;
use super::results::{Metric, Results};
use super::settings::Settings;

const PANEL_W: f64 = 330.0;
const PANEL_H: f64 = 230.0;
const COLUMNS: usize = 3;
const TOP: f64 = 70.0;

fn color(subject: &str) -> &'static str {
    match subject {
        "direct" | "no-auth" => "#8c8c8c",
        "tcpgate-ebpf" | "preamble" => "#1f77b4",
        "tcpgate-userspace" | "no-auth-userspace" => "#9ecae1",
        "haproxy" => "#d62728",
        "socat" => "#ff7f0e",
        "grant" => "#2ca02c",
        "preamble-copy-first" => "#6baed6",
        "grant-copy-first" => "#74c476",
        _ => "#555555",
    }
}

fn label(subject: &str) -> &str {
    match subject {
        "tcpgate-ebpf" => "eBPF",
        "tcpgate-userspace" => "userspace",
        "no-auth-userspace" => "no-auth us",
        "preamble-copy-first" => "preamble cf",
        "grant-copy-first" => "grant cf",
        "haproxy" => "HAProxy",
        other => other,
    }
}

/// An absolute goal drawn as a dashed line: (value, label).
fn goal_line(metric: Metric) -> Option<(f64, String)> {
    absolute_target(metric).map(|target| (target.limit(), format!("goal {target}")))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn value_text(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn chart(results: &Results, machine: &Machine, settings: &Settings) -> String {
    let metrics: Vec<Metric> = Metric::ALL
        .into_iter()
        // A figure per program and turn: for the tables, not a panel.
        .filter(|&m| m != Metric::EbpfRunTime && !results.subjects(m).is_empty())
        .collect();
    let rows = metrics.len().div_ceil(COLUMNS).max(1);
    let width = PANEL_W * COLUMNS as f64 + 20.0;
    let height = TOP + PANEL_H * rows as f64 + 10.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        svg,
        "<text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">tcpgate benchmark: \
         bars are medians ({} runs per data-path figure), whiskers min–max</text>",
        settings.runs
    );
    let _ = writeln!(
        svg,
        "<text x=\"10\" y=\"42\" fill=\"#444\">{} × {}, Linux {}, TCP {}, load {} → {}, {} ({} mode)</text>",
        machine.nproc,
        escape(&machine.cpu_model),
        escape(&machine.kernel),
        escape(&settings.congestion_control.to_string()),
        escape(&machine.load_before),
        escape(&machine.load_after),
        escape(&machine.date),
        settings.mode
    );
    for (i, metric) in metrics.iter().enumerate() {
        let x0 = 10.0 + PANEL_W * (i % COLUMNS) as f64;
        let y0 = TOP + PANEL_H * (i / COLUMNS) as f64;
        panel(&mut svg, results, *metric, x0, y0);
    }
    svg.push_str("</svg>\n");
    svg
}

fn panel(svg: &mut String, results: &Results, metric: Metric, x0: f64, y0: f64) {
    let better = if metric.higher_is_better() {
        "higher is better"
    } else {
        "lower is better"
    };
    let goal_note = goal_line(metric)
        .map(|(_, text)| format!(", dashed: {text}"))
        .unwrap_or_default();
    let _ = writeln!(
        svg,
        "<text x=\"{x0}\" y=\"{}\" font-weight=\"bold\">{}</text>\
         <text x=\"{x0}\" y=\"{}\" fill=\"#666\">{}, {better}{}</text>",
        y0 + 12.0,
        escape(metric.title()),
        y0 + 26.0,
        escape(metric.unit()),
        escape(&goal_note),
    );
    let summaries: Vec<_> = results
        .subjects(metric)
        .into_iter()
        .filter_map(|s| results.summary(metric, s).map(|sum| (s, sum)))
        .collect();
    let goal = goal_line(metric);
    let top = summaries
        .iter()
        .map(|(_, s)| s.max.max(s.median))
        .fold(goal.as_ref().map_or(0.0, |(v, _)| *v), f64::max);
    let scale_max = if top > 0.0 { top * 1.18 } else { 1.0 };
    let (plot_top, plot_bottom) = (y0 + 40.0, y0 + PANEL_H - 36.0);
    let plot_h = plot_bottom - plot_top;
    let slot = (PANEL_W - 30.0) / summaries.len().max(1) as f64;
    let bar_w = (slot * 0.62).min(44.0);
    let _ = writeln!(
        svg,
        "<line x1=\"{x0}\" y1=\"{plot_bottom}\" x2=\"{}\" y2=\"{plot_bottom}\" stroke=\"#999\"/>",
        x0 + PANEL_W - 30.0
    );
    let y_of = |v: f64| plot_bottom - (v / scale_max).clamp(0.0, 1.0) * plot_h;
    if let Some((value, _)) = &goal {
        let y = y_of(*value);
        let _ = writeln!(
            svg,
            "<line x1=\"{x0}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#2a2\" \
             stroke-dasharray=\"5 3\"/>",
            x0 + PANEL_W - 30.0,
        );
    }
    for (j, (subject, s)) in summaries.iter().enumerate() {
        let cx = x0 + slot * (j as f64 + 0.5);
        let y = y_of(s.median);
        let _ = writeln!(
            svg,
            "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{bar_w:.1}\" height=\"{:.1}\" fill=\"{}\"/>",
            cx - bar_w / 2.0,
            plot_bottom - y,
            color(subject)
        );
        let (ymin, ymax) = (y_of(s.min), y_of(s.max));
        let _ = writeln!(
            svg,
            "<path d=\"M{cx:.1} {ymin:.1}V{ymax:.1}M{:.1} {ymin:.1}h8M{:.1} {ymax:.1}h8\" stroke=\"#222\" fill=\"none\"/>",
            cx - 4.0,
            cx - 4.0
        );
        let _ = writeln!(
            svg,
            "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
             <text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#333\">{}</text>",
            ymax.min(y) - 4.0,
            value_text(s.median),
            plot_bottom + 14.0,
            escape(label(subject))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_panel_per_measured_metric_with_a_bar_per_subject() {
        let mut r = Results::default();
        for (c, v) in [("direct", 10.0), ("tcpgate-ebpf", 8.0), ("haproxy", 4.0)] {
            r.add(Metric::ThroughputOneStream, c, v);
        }
        r.add(Metric::TeardownP99, "tcpgate-ebpf", 12.5);
        let machine = Machine {
            date: "2026-01-01T00:00:00Z".into(),
            nproc: 2,
            cpu_model: "AMD <EPYC>".into(),
            kernel: "6.18".into(),
            load_before: "1.0 1.0 1.0".into(),
            load_after: "2.0 2.0 2.0".into(),
            tools: vec![],
            congestion_control_default: "bbr".into(),
        };
        let settings =
            super::super::settings::Settings::from_args(&super::super::settings::BenchArgs {
                quick: true,
                runs: None,
                only: vec![],
                contenders: vec![],
                out: "target/bench".into(),
                congestion_control: "cubic".parse().expect("valid"),
                rps: false,
                bpf_stats: false,
            })
            .expect("settings");
        let svg = chart(&r, &machine, &settings);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert_eq!(svg.matches("<rect x=").count(), 4, "{svg}");
        assert!(svg.contains("AMD &lt;EPYC&gt;"), "escaped: {svg}");
        assert!(svg.contains("TCP cubic"), "the congestion control: {svg}");
        assert!(svg.contains(">eBPF<") && svg.contains(">12.5<"), "{svg}");
        assert!(
            !svg.contains("CPU per GiB"),
            "unmeasured metrics get no panel"
        );
    }
}
