"""The plan's confirmatory test (PLAN.md): H1 and H2 at 600 steps, two-sided paired t on the
paired seeds both arms have, Holm over {H1, H2}. Reads the report's evals.csv; run from the
repository root after `bench report embedded_confirm ... --out results/studies/embedded/confirm`."""

import pandas as pd
import scipy.stats as st

from bench.report.stats import holm_adjust

ev = pd.read_csv("results/studies/embedded/confirm/embedded_confirm/evals.csv")
fd = ev[(ev["metric"] == "fd_classifier") & (ev["step"] == 600)]
base = fd[(fd["spec"] == "latent_only") & (fd["setting"] == "plain")].set_index("train.seed")["value"]
arms = {"H1 repa - latent_only": fd[(fd["spec"] == "repa") & (fd["setting"] == "plain")],
        "H2 whitened redi_rg + RG - latent_only": fd[(fd["spec"] == "redi_rg") & (fd["setting"] == "rg1.5")]}
rows = []
for name, part in arms.items():
    d = (part.set_index("train.seed")["value"] - base).dropna()  # seeds both have
    test = st.ttest_rel(part.set_index("train.seed")["value"][d.index], base[d.index])
    ci = test.confidence_interval(0.95)
    rows.append((name, d, ci, test.pvalue))
for (name, d, ci, p), holm in zip(rows, holm_adjust([r[3] for r in rows])):
    print(f"{name}: n={len(d)} pairs {d.round(2).tolist()} mean {d.mean():+.2f} [{ci.low:+.2f}, {ci.high:+.2f}] "
          f"p={p:.3g} Holm p={holm:.3g} -> {'confirmed' if holm < 0.05 else 'not confirmed'}")
