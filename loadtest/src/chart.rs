//! The SVG chart of a run: rates on top, lateness percentiles below, per second.

use std::path::Path;

use plotters::coord::combinators::IntoLogRange;
use plotters::prelude::*;

use crate::report::Report;

/// A named line: its label, colour and how to read its value from a second.
type Line<T> = (&'static str, RGBColor, fn(&T) -> u64);

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing chart: {e:?}")
}

/// Draws `report`'s timeline into `path`.
pub fn write_svg(report: &Report, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1100, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(380);
    let tl = &report.timeline;
    let secs = tl.len().max(1) as f64;

    let max_rate = tl
        .iter()
        .map(|s| s.acked.max(s.delivered))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let mut rates = ChartBuilder::on(&top)
        .caption(
            format!(
                "{:?} run {}: rates (target {}/s)",
                report.scenario, report.run_id, report.settings.rate
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..secs, 0f64..max_rate * 1.1)
        .map_err(err)?;
    rates
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("timers/s")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    let series: [Line<crate::report::SecondReport>; 2] = [
        ("acknowledged/s", BLUE, |s| s.acked),
        ("fired/s", RED, |s| s.delivered),
    ];
    for (label, color, value) in series {
        rates
            .draw_series(LineSeries::new(
                tl.iter().map(|s| (s.t as f64, value(s) as f64)),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    rates
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(err)?;

    // Lateness spans 0 ms to seconds, so a log axis; +1 keeps a 0 ms second on the chart.
    let max_late = tl.iter().map(|s| s.lateness_ms.max).max().unwrap_or(0) as f64 + 1.0;
    let mut late = ChartBuilder::on(&bottom)
        .caption("fire lateness per second (ms + 1, log)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..secs, (1f64..max_late * 2.0).log_scale())
        .map_err(err)?;
    late.configure_mesh()
        .x_desc("seconds since start")
        .y_desc("ms + 1")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    let pcts: [Line<crate::report::Percentiles>; 4] = [
        ("p50", GREEN, |p| p.p50),
        ("p99", BLUE, |p| p.p99),
        ("p99.9", MAGENTA, |p| p.p999),
        ("max", RED, |p| p.max),
    ];
    for (label, color, value) in pcts {
        late.draw_series(LineSeries::new(
            tl.iter()
                .filter(|s| s.lateness_ms.count > 0)
                .map(|s| (s.t as f64, value(&s.lateness_ms) as f64 + 1.0)),
            color.stroke_width(2),
        ))
        .map_err(err)?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    late.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
