//! `report.html` of a run: charts per round of reward, pass@k, KL (where measured) and the
//! training loss per step, then every round's metrics as a table. One self-contained file
//! (inline SVG from plotters, no scripts), so it opens anywhere and can be archived as is.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::{PipelineError, Result};
use crate::run_dir::{METRICS_FILE, Stage};

pub const REPORT_FILE: &str = "report.html";

const SIZE: (u32, u32) = (560, 320);
const PALETTE: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

/// (x, y) points of a line.
type Points = Vec<(f64, f64)>;
/// A named line.
type Series = (String, Points);

/// Writes `<run>/report.html` from the run's metrics; returns its path.
pub fn write_report(run: &Path) -> Result<PathBuf> {
    let rounds = read_jsonl(&run.join(METRICS_FILE))?;
    let per_round = |key: &str| -> Points {
        rounds
            .iter()
            .filter_map(|m| Some((*m.get("round")?, *m.get(key)?)))
            .collect()
    };
    let mut pass_keys: Vec<&String> = rounds
        .iter()
        .flat_map(|m| m.keys())
        .filter(|k| k.starts_with("pass@"))
        .collect();
    pass_keys.sort_by_key(|k| k[5..].parse::<u32>().unwrap_or(u32::MAX));
    pass_keys.dedup();

    let mut charts = Vec::new();
    charts.push(chart(
        "Reward (mean of the round's samples)",
        "round",
        &[("reward/mean".into(), per_round("reward/mean"))],
    )?);
    let pass: Vec<Series> = pass_keys
        .iter()
        .map(|k| ((*k).clone(), per_round(k)))
        .collect();
    if !pass.is_empty() {
        charts.push(chart("pass@k", "round", &pass)?);
    }
    let kl = per_round("kl");
    charts.push(if kl.is_empty() {
        "<p class=\"none\">KL: not measured by this run's algorithm.</p>".to_owned()
    } else {
        chart("KL to the reference", "round", &[("kl".into(), kl)])?
    });
    let (loss, accuracy) = training_curves(run, rounds.len())?;
    if !loss.is_empty() {
        charts.push(chart(
            "Training loss per step (all rounds)",
            "step",
            &[("loss".into(), loss)],
        )?);
    }
    if !accuracy.is_empty() {
        charts.push(chart(
            "rewards/accuracies per step (all rounds)",
            "step",
            &[("rewards/accuracies".into(), accuracy)],
        )?);
    }

    let mut html = String::new();
    let name = run.file_name().unwrap_or_default().to_string_lossy();
    write!(
        html,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>prefloop run {name}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}.charts{{display:flex;flex-wrap:wrap;\
         gap:1em}}table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;\
         padding:2px 6px;text-align:right}}.none{{color:#888}}</style></head><body>\n\
         <h1>prefloop run {name}</h1>\n<p>{} round(s) measured; from {}.</p>\n\
         <div class=\"charts\">\n",
        rounds.len(),
        run.join(METRICS_FILE).display()
    )
    .expect("writes to a String");
    for c in &charts {
        html.push_str(c);
        html.push('\n');
    }
    html.push_str("</div>\n<h2>Metrics per round</h2>\n");
    html.push_str(&table(&rounds));
    html.push_str(&prompt_table(&crate::run_dir::read_state(run)?));
    html.push_str("</body></html>\n");
    let path = run.join(REPORT_FILE);
    prefloop_data::write_atomic(&path, html.as_bytes())?;
    Ok(path)
}

/// Where the run chooses prompts round by round: each round's files, count and hash.
fn prompt_table(state: &crate::run_dir::RunState) -> String {
    let rows: Vec<String> = state
        .rounds
        .iter()
        .filter_map(|r| {
            let prompts = r.prompts.as_ref()?;
            let files: Vec<String> = prompts
                .files
                .iter()
                .map(|f| escape(&f.path.display().to_string()))
                .collect();
            Some(format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td style=\"text-align:left\">{}</td></tr>",
                r.round,
                prompts.problem_ids.len(),
                &prompts.hash[..12],
                files.join("<br>")
            ))
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    format!(
        "<h2>Prompts per round</h2>\n<table><tr><th>round</th><th>prompts</th><th>hash</th>\
         <th>files</th></tr>\n{}\n</table>\n",
        rows.join("\n")
    )
}

/// Text made safe inside HTML.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Every line of a JSON-lines file of numbers (non-numbers are skipped).
fn read_jsonl(path: &Path) -> Result<Vec<BTreeMap<String, f64>>> {
    let text = std::fs::read_to_string(path).map_err(PipelineError::io(path))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let value: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line)
                .map_err(|e| PipelineError::Data {
                    path: path.to_owned(),
                    message: format!("line {}: {e}", i + 1),
                })?;
            Ok(value
                .into_iter()
                .filter_map(|(k, v)| Some((k, v.as_f64()?)))
                .collect())
        })
        .collect()
}

/// Loss and rewards/accuracies of every training step of every round, steps numbered across
/// rounds.
fn training_curves(run: &Path, rounds: usize) -> Result<(Points, Points)> {
    let (mut loss, mut accuracy, mut step) = (Vec::new(), Vec::new(), 0.0);
    for round in 0..rounds {
        let path = run
            .join(format!("round-{round:04}"))
            .join(Stage::Train.dir_name())
            .join(prefloop_train::METRICS_FILE);
        if !path.exists() {
            continue;
        }
        for line in read_jsonl(&path)? {
            step += 1.0;
            if let Some(v) = line.get("loss") {
                loss.push((step, *v));
            }
            if let Some(v) = line.get("rewards/accuracies") {
                accuracy.push((step, *v));
            }
        }
    }
    Ok((loss, accuracy))
}

/// One line chart as an inline `<svg>`.
fn chart(title: &str, x_label: &str, series: &[Series]) -> Result<String> {
    let points = || series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1) = bounds(points().map(|p| p.0));
    let (mut y0, mut y1) = bounds(points().map(|p| p.1));
    if x1 - x0 < 1.0 {
        (x0, x1) = (x0 - 0.5, x1 + 0.5);
    }
    let pad = ((y1 - y0) * 0.1).max(1e-3);
    (y0, y1) = (y0 - pad, y1 + pad);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        let draw = |e: &dyn std::fmt::Display| PipelineError::Data {
            path: PathBuf::from(REPORT_FILE),
            message: format!("drawing `{title}`: {e}"),
        };
        root.fill(&WHITE).map_err(|e| draw(&e))?;
        let mut plot = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| draw(&e))?;
        plot.configure_mesh()
            .x_desc(x_label)
            .x_labels(8)
            .y_labels(6)
            .draw()
            .map_err(|e| draw(&e))?;
        for (i, (name, data)) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            plot.draw_series(LineSeries::new(data.iter().copied(), color.stroke_width(2)))
                .map_err(|e| draw(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
            plot.draw_series(data.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| draw(&e))?;
        }
        plot.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw(&e))?;
        root.present().map_err(|e| draw(&e))?;
    }
    Ok(svg)
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) }
}

/// Every round's metrics, a row per round and a column per metric.
fn table(rounds: &[BTreeMap<String, f64>]) -> String {
    let mut keys: Vec<&String> = rounds.iter().flat_map(|m| m.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.retain(|k| k.as_str() != "round");
    let mut html = String::from("<table><tr><th>round</th>");
    for k in &keys {
        write!(html, "<th>{k}</th>").expect("writes to a String");
    }
    html.push_str("</tr>\n");
    for m in rounds {
        write!(
            html,
            "<tr><td>{}</td>",
            m.get("round").copied().unwrap_or(f64::NAN)
        )
        .expect("writes to a String");
        for k in &keys {
            match m.get(*k) {
                Some(v) => write!(html, "<td>{v:.4}</td>"),
                None => write!(html, "<td></td>"),
            }
            .expect("writes to a String");
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_charts_every_round_and_tabulates_its_metrics() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(METRICS_FILE),
            "{\"round\":0,\"reward/mean\":1.5,\"pass@1\":0.25,\"pass@4\":0.5}\n\
             {\"round\":1,\"reward/mean\":2.5,\"pass@1\":0.375,\"pass@4\":0.75}\n",
        )
        .unwrap();
        let train = dir.path().join("round-0000/train");
        std::fs::create_dir_all(&train).unwrap();
        std::fs::write(
            train.join(prefloop_train::METRICS_FILE),
            "{\"step\":1,\"loss\":0.69,\"rewards/accuracies\":0.5}\n\
             {\"step\":2,\"loss\":0.52,\"rewards/accuracies\":1.0}\n",
        )
        .unwrap();
        let path = write_report(dir.path()).unwrap();
        let html = std::fs::read_to_string(path).unwrap();
        // Reward, pass@k, loss and accuracy charts; KL is said to be absent.
        assert_eq!(html.matches("<svg").count(), 4, "{html}");
        for text in [
            "Reward",
            "pass@1",
            "pass@4",
            "Training loss",
            "KL: not measured",
        ] {
            assert!(html.contains(text), "{text} in the report");
        }
        // Two rounds in the table, with their values.
        assert_eq!(html.matches("<tr><td>").count(), 2);
        assert!(html.contains("<td>2.5000</td>") && html.contains("<td>0.7500</td>"));
        // Each line is a polyline through one point per round or step.
        assert!(html.contains("<polyline"), "lines drawn");
    }

    #[test]
    fn a_run_without_metrics_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_report(dir.path()).unwrap_err().to_string();
        assert!(err.contains(METRICS_FILE), "{err}");
    }
}
