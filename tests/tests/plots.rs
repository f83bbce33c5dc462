//! Training-curve pictures: every run writes `training_curves.png` from
//! its `metrics.jsonl` at each checkpoint and at the end, and `oxtune plot`
//! overlays runs. The tests check the picture decodes with a plausible
//! size and that the data drawn are the run's logged values (not pixels).

use oxtune_plot::{panels, read_metrics, TRAINING_CURVES};
use oxtune_tests::cli::{fresh_dir, metrics, oxtune, scratch, succeeded, tiny};

const CHATS: &str = concat!(
    "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
    "{\"messages\": [{\"role\": \"user\", \"content\": \"sky?\"}, {\"role\": \"assistant\", \"content\": \"blue\"}]}\n",
    "{\"messages\": [{\"role\": \"user\", \"content\": \"2+2?\"}, {\"role\": \"assistant\", \"content\": \"4\"}]}\n",
    "{\"messages\": [{\"role\": \"user\", \"content\": \"fruit?\"}, {\"role\": \"assistant\", \"content\": \"apple\"}]}\n",
);

/// Decodes a PNG and returns its size and how many distinct colours it uses.
fn picture(path: &std::path::Path) -> (u32, u32, usize) {
    let image = image::open(path).unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display())).to_rgb8();
    let colours: std::collections::HashSet<[u8; 3]> = image.pixels().map(|p| p.0).collect();
    (image.width(), image.height(), colours.len())
}

#[test]
fn runs_draw_their_curves_and_plot_overlays_them() {
    let data = scratch("plot-chats.jsonl", CHATS);
    let mut outs = Vec::new();
    for (name, lr) in [("plot-a", "1e-3"), ("plot-b", "3e-3")] {
        let out = fresh_dir(name);
        let args = [
            "sft",
            "--model",
            &tiny("tiny-qwen3"),
            "--dataset",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--max-steps",
            "4",
            "--save-steps",
            "2",
            "--learning-rate",
            lr,
            "--split-ratio",
            "0.25",
            "--eval-steps",
            "2",
        ];
        succeeded(&oxtune(&args, &[]));
        outs.push(out);
    }
    let out = &outs[0];
    let png = out.join(TRAINING_CURVES);
    let (width, height, colours) = picture(&png);
    // Loss (with eval loss), learning rate and gradient norm: two columns, two rows.
    assert!(width >= 1000 && height >= 700, "{width}x{height}");
    assert!(colours > 20, "a drawn picture, not a blank one: {colours} colours");
    // What is drawn is what the run logged.
    let run = read_metrics(&out.join("metrics.jsonl"), "plot-a").unwrap();
    let logged = metrics(out);
    assert_eq!(run.series["loss"].len(), logged.len());
    assert_eq!(run.series["loss"][3], (4.0, logged[3]["loss"].as_f64().unwrap()));
    assert_eq!(run.series["eval_loss"].len(), 2, "eval loss at steps 2 and 4");
    let titles: Vec<&str> = panels(&[run]).iter().map(|p| p.title).collect();
    assert_eq!(titles, vec!["loss", "learning rate", "gradient norm"]);

    let both = scratch("both.png", "");
    let args = ["plot", outs[0].to_str().unwrap(), outs[1].to_str().unwrap(), "--output", both.to_str().unwrap()];
    succeeded(&oxtune(&args, &[]));
    let (w, h, _) = picture(&both);
    assert_eq!((w, h), (width, height), "the same panels, both runs overlaid");
    assert!(std::fs::read(&both).unwrap() != std::fs::read(&png).unwrap());

    let err = oxtune(&["plot", data.to_str().unwrap()], &[]);
    let text = String::from_utf8_lossy(&err.stderr);
    assert!(!err.status.success() && text.contains("plot-chats.jsonl:1") && text.contains("step"), "{text}");
}
