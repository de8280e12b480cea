//! A bar chart of the sidecar comparison as SVG, written by hand: added p50 and p90 over
//! direct per scenario, one group per protocol. (Nothing else in the project draws, so a
//! plotting crate would be a large dependency for one chart.)
use crate::{parts::sidecars::Row, scenarios::Scenario};

const COLORS: [&str; 5] = ["#9e9e9e", "#d95f02", "#7570b3", "#1b9e77", "#66a61e"];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn latency_chart(rows: &[Row]) -> String {
    let protocols: Vec<_> = {
        let mut p: Vec<_> = rows.iter().map(|r| format!("{:?}", r.protocol)).collect();
        p.dedup();
        p
    };
    let max = rows
        .iter()
        .map(|r| r.added_p90_us.max(r.added_p50_us))
        .fold(1.0_f64, f64::max);
    let (w, h, left, top, bottom) = (960.0, 420.0, 70.0, 40.0, 90.0);
    let plot_h = h - top - bottom;
    let group_w = (w - left - 20.0) / protocols.len().max(1) as f64;
    let bar_w = group_w / (Scenario::ALL.len() as f64 * 2.0 + 2.0);
    let y = |v: f64| top + plot_h - plot_h * (v.max(0.0) / max);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"{left}\" y=\"20\" font-size=\"15\">Added latency over direct (us): p50 solid, p90 light</text>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        top + plot_h,
        w - 20.0,
        top + plot_h
    );
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text><line x1=\"{left}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#eee\"/>\n",
            left - 6.0,
            y(v) + 4.0,
            y(v),
            w - 20.0,
            y(v)
        ));
    }
    for (gi, protocol) in protocols.iter().enumerate() {
        let gx = left + group_w * gi as f64 + bar_w;
        for (si, scenario) in Scenario::ALL.iter().enumerate() {
            let Some(row) = rows
                .iter()
                .find(|r| format!("{:?}", r.protocol) == *protocol && r.scenario == *scenario)
            else {
                continue;
            };
            let x = gx + bar_w * 2.0 * si as f64;
            for (j, (v, opacity)) in [(row.added_p50_us, 1.0), (row.added_p90_us, 0.45)]
                .into_iter()
                .enumerate()
            {
                let bx = x + bar_w * j as f64;
                s.push_str(&format!(
                    "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\" fill-opacity=\"{opacity}\"><title>{} {}: {v:.0} us</title></rect>\n",
                    y(v),
                    bar_w * 0.9,
                    top + plot_h - y(v),
                    COLORS[si],
                    escape(protocol),
                    escape(scenario.label())
                ));
            }
        }
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
            gx + group_w / 2.0 - bar_w,
            top + plot_h + 20.0,
            escape(protocol)
        ));
    }
    for (si, scenario) in Scenario::ALL.iter().enumerate() {
        let lx = left + 180.0 * si as f64;
        s.push_str(&format!(
            "<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            h - 40.0,
            COLORS[si],
            lx + 16.0,
            h - 30.0,
            escape(scenario.label())
        ));
    }
    s.push_str("</svg>\n");
    s
}
