"""PFLlib's benchmark protocol on Fashion-MNIST, our algorithms beside PFLlib's published figures.

Protocol: 20 clients, join ratio 1, 75/25 split, batch 10, 1 local epoch, lr 0.005, cnn4, every
client evaluated every round; the pathological (2 classes per client, ``pat``) and practical
(Dirichlet 0.1, ``dir``) scenarios. The figure is the best mean test accuracy over the
evaluated rounds (PFLlib reports the best over 2,000 rounds; we state the rounds we ran).

Resumable: finished rows are kept in ``benchmarks/results/pfllib_fmnist.json`` and skipped; an
interrupted run continues from its checkpoint, and asking for more rounds continues a finished
one (runs live in ``runs/pfllib_fmnist/``).

Where a run executes (``--set device=cuda``, ``threads``, the executor, checkpointing) is not part
of a row's key: a GPU run of the protocol is the protocol's row, with its device stated beside it.
``benchmarks/device_pfllib.sh`` runs many rows at once on a GPU machine under a time budget
(``--deadline``: a run stops after the first round that ends past it, and its row says how many
rounds it ran); ``--merge`` adds such rows to the table here.

    python benchmarks/reproduce_pfllib.py --algorithms ditto fedproto --scenarios dir --rounds 20
    python benchmarks/reproduce_pfllib.py --table      # rewrite the markdown from the JSON
    python benchmarks/reproduce_pfllib.py --merge /tmp/rows.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from reproduce_htfl import (  # (this folder is on sys.path)
    add_budget_options,
    machine_name,
    run_or_cut_off,
    split_runtime,
    stop_on_sigterm,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ROWS = RESULTS / "pfllib_fmnist.json"
RUNS = ROOT / "runs" / "pfllib_fmnist"

# PFLlib's published FMNIST figures (docs/benchmark.html): pathological / practical, in %
PUBLISHED: dict[str, tuple[float, float]] = {
    "fedavg": (80.41, 85.85),
    "fedper": (99.47, 97.44),
    "fedrep": (99.56, 97.56),
    "fedbabu": (99.41, 97.46),
    "fedrod": (99.52, 97.52),
    "fedcp": (99.66, 97.89),
    "gpfl": (99.85, 97.81),
    "feddbe": (99.74, 97.69),
    "ditto": (99.44, 97.47),
    "fedproto": (99.49, 97.40),
    "perfedavg": (99.18, 95.10),
    "pfedme": (99.35, 97.25),
    "apfl": (99.41, 97.25),
    "fedfomo": (99.46, 97.21),
    "fedamp": (99.42, 97.20),
    "apple": (99.30, 97.06),
    "fedala": (99.57, 97.66),
}
NOTES = [
    "Notes.",
    "",
    "- Rows marked `data.shuffle_classes=true` ran before the pathological split gave clients "
    "their classes in label order, as PFLlib does (pairs (0, 1), (2, 3), …: T-shirt/trouser, "
    "pullover/dress, coat/sandal, shirt/sneaker, bag/boot). Their seeded order paired shirt with "
    "T-shirt, the hardest two classes of Fashion-MNIST, on 4 of the 20 clients, which holds a "
    "personalized method near 96.6% however long it trains (FedPer from round 8 on). They are "
    "kept as measured; the protocol's `pat` rows are those without the mark.",
    "- Rows `on` H200 ran on one GPU machine of 16 cores, one process per row "
    "(`benchmarks/device_pfllib.sh`), under a time budget (fewer rounds than 20 where it ran "
    "out). Those dated 2026-11-26 ran 15 at a time, and their seconds per round are those of "
    "that crowd (FedAvg 32 s, FedRep 470 s); those dated 2026-11-27 ran 8 at a time, where "
    "FedAvg took 11.1 s a round, what one process alone takes there (scaled from 8,000 "
    "samples, `benchmarks/results/shared_gpu.md`), with the GPU busy in 95-99% of the samples "
    "of `nvidia-smi` and a load average of about 7.5: 8 processes fill the GPU's time slices, "
    "15 only make each slower. On that machine FedALA (249 s a round over its first two "
    "rounds, which include ALA's training to convergence) was far slower than FedAvg-like "
    "rows (11-15 s); not investigated. APFL's first row (129 s, round 1) ran beside 14 others; "
    "in the second H200 call of 2026-11-27 (8 at a time) it took 30-32 s a round, twice "
    "FedAMP's 15 s, as two models train per batch.",
    "- FedAvg's gap is one of rounds: PFLlib's own FedAvg code on exactly these clients "
    "(`benchmarks/pfllib_crosscheck.py`, `pfllib_crosscheck.md`, CPU 2026-11-27) reaches "
    "68.68 (pat) and 67.39 (dir) at round 20, against our 68.00 (best, round 19) and 67.90; "
    "PFLlib's 80.41 and 85.85 are bests over 2,000 rounds.",
    "- FedDBE's gap (−28 dir, −16 pat at round 20) is one of rounds, as far as 20 rounds "
    "show: its model is FedAvg's (PFLlib's FedAvg figure, 85.85 dir, is ours at 67.90 after "
    "20 rounds), and its personal part is only a feature shift z_p that is trained with the "
    "local model and kept, so the per-client logit bias W z_p it gives the averaged head grows "
    "round by round. FedAvg → FedDBE test accuracy (8 at a time on the H200, 2026-11-27), pat: "
    "round 2 44 → 56, 10 63 → 74, 20 68 → 84 (the lead grows from 11 to 16 points); dir: 4 "
    "44 → 42, 10 59 → 54, 20 68 → 70 (behind while the mean regularisation, weight 50, pulls "
    "the features, ahead from round 19). Not run past 20 rounds. PFLlib's own FedDBE code on "
    "exactly these pat clients with our defaults (`-klw 50 -mo 1`, `pfllib_crosscheck.md`, CPU "
    "2026-11-27) climbs the same way, 60.0 at round 2, 76.3 at 10 and 87.06 at 20, still "
    "rising: within 20 rounds it too is 13 points under its 99.74, so the gap is one of "
    "rounds. Its 3 points over ours were not traced (seed-level spread is about that much for "
    "GPFL; PFLlib also trains every client once more in its warm-up).",
    "- Per-FedAvg's default row (the paper's inner step alpha = 0.001, one local pass) "
    "plateaus near 89-90 pat; with PFLlib's settings (`algorithm.alpha=0.005`, its learning "
    "rate, for the personalisation step, and `algorithm.passes=2`: PFLlib's client runs its "
    "local procedure twice a round) the same code reaches 97.85 at round 20 (CPU, 2026-11-27; "
    "97.26 at round 15 against the default's 89.66 at 11-15), 1.3 below PFLlib's 99.18. Likely "
    "the larger share is alpha's, since a client is evaluated after one personalisation step "
    "of size alpha, but the two changes were not run apart.",
    "- GPFL pat: the dip after its first peak is GPFL's, not ours. PFLlib's own GPFL code on "
    "exactly these clients (`benchmarks/pfllib_crosscheck.py` with our defaults `-lam 0.01 "
    "-mu 0.1`, CPU 2026-11-27) peaks at 96.66 in round 8, falls to 88.81 by round 13 and ends "
    "at 94.05 in round 20. A second run of its code (its server's steps in the order of its "
    "`train()`, driven by a script of ours so that ours could start from the same weights) "
    "peaks at 97.09 in round 8, falls to 89.32 by round 12 and ends at 94.83; ours, started "
    "from exactly those initial weights with `algorithm.conditional_inputs=local` (PFLlib's "
    "order of updates), tracks it within 2.8 points every round (97.12 at round 8, 94.17 at "
    "20), and one local epoch of the two clients from the same state gives the same weights "
    "to 6e-8. What dips is the evaluation before training: at round 20 the clients of our row "
    "average 89.1% with the round's averaged body and valve under their personal heads, 99.0% "
    "right after their own local epoch. Our rows start from our seed's initial weights and "
    "peak lower (93.87 default, 93.49 `local`): within 20 rounds the figure moves by about 3 "
    "points with the initial weights alone. PFLlib's 99.85 is a best over 2,000 rounds; our "
    "dir run on the GPU was still rising at round 17 (91.32).",
    "- Second H200 call of 2026-11-27 (10 rows, 8 at a time, 520 s): FedAMP finished 20 "
    "rounds (98.56 pat, 94.44 dir); APPLE ran 17 and is level with PFLlib's figures by round "
    "14 (99.32 against 99.30 pat, 97.59 against 97.06 dir); APFL ran 15-16 and climbs slowly "
    "(82.97 pat, 75.61 dir; our mix weight starts at the paper's 0.5, PFLlib's at 1.0, i.e. "
    "at the purely local model: the cause of the gap, see the next note). FedFomo stopped in "
    "round 2 on CUDA (received peer models were left on the CPU; fixed, and "
    "`tests/test_conformance.py` now runs every algorithm on CUDA where there is one: all "
    "pass on the H200 but FedKTL, whose builtin generator needs diffusers, absent there); "
    "its 20-round rows then ran on the CPU, level with PFLlib's (99.26 against 99.46 pat, "
    "97.20 against 97.21 dir). "
    "pFedMe with the paper's inner step 0.1 went to a NaN loss in round 1 and stayed at "
    "chance (10.0%), on the H200 and on the CPU alike; those rows are not kept, the default "
    "inner step is now 0.01 (PFLlib's), and a run whose training loss is not finite now "
    "stops with an error (`federation.stop_on_divergence`). With 0.01 pFedMe pat reached "
    "98.82 at round 18 (CPU; 97.27 after round 1), 0.5 below PFLlib's 99.35; dir reached "
    "95.40 at round 17 (CPU; 93.9 at round 7, 94.2 at 20), 1.85 below PFLlib's 97.25, a gap "
    "not traced (PFLlib's figure is a best over 2,000 rounds; no longer run here).",
    "- Third H200 call of 2026-11-27 (8 rows, 8 at a time, 540 s). APFL started at PFLlib's "
    "mix weight (`algorithm.alpha=1.0`: the personal model starts as the purely local one) is "
    "level with PFLlib within 16 rounds: 97.25 dir (PFLlib 97.25) and 99.18 pat (99.41), "
    "against 75.61 and 82.97 from the paper's 0.5. With 0.5 half of every personal model is "
    "the global one, which on these splits is FedAvg's (68% here), and the local model learns "
    "at half the step; alpha climbs towards 1 at the protocol's step size 0.005, too slowly "
    "for 20 rounds. The default stays the paper's 0.5. FedBABU ran 7-8 rounds: 98.98 pat "
    "(PFLlib 99.41) and 96.64 dir (97.46), both within a point; it costs 61 s a round there, "
    "53 of them in evaluation, as every evaluation fine-tunes a copy of each client's head and "
    "body for the paper's 5 epochs (PFLlib fine-tunes once, after its last round, and reports "
    "the best over its rounds without). GPFL dir reached 92.16 at round 18, still rising. "
    "Per-FedAvg dir with the paper's settings finished 20 rounds at 80.01 (PFLlib 95.10; its "
    "pat row shows what PFLlib's settings add). FedALA's two rows were stopped by the call's "
    "limit after one round: round 1's evaluation took 430 s, 20 clients learning their "
    "aggregation weights to convergence (the paper's first round) on a copy that the "
    "evaluation does not keep, so round 2's training learns them to convergence again (a CPU "
    "probe with 3,000 samples: 2.6 s training and 10.9 s evaluation in round 1, 13.1 s "
    "training in round 2, then 3.4 s). PFLlib learns once per round, before it evaluates and "
    "trains; here the evaluation repeats the weight learning of the next round's training. "
    "Since then the first learning computes the body's features once and learns on the head "
    "alone: the same metrics bit for bit, round 1's evaluation 5x and round 2's training about 3x "
    "faster on the CPU (`benchmarks/results/fedala_first_aggregation.md`); not yet run on the "
    "GPU.",
    "- CPU rows of 2026-11-27 (sixth session; two runs at a time, 38-58 s a round for the "
    "FedAvg-like ones). PFLlib's tables give no FMNIST figure for FedLC, FedNTD, FedDyn or "
    "FedCAC; FedAvg here reaches 68.0 pat / 67.9 dir in 20 rounds. FedLC dir 69.06, FedNTD "
    "64.16 pat / 70.77 dir, FedDyn 79.85 dir (still rising) and 70.71 pat (between 44.6 and "
    "70.7 from round to round after round 10): all still climbing at round 20, as FedAvg is. "
    "FedCAC pat reached 98.86 at round 5 and then fell to 90-92 from round 10 on (final "
    "90.89); its overlap threshold has risen only 0.1 of the way at round 10 (beta = 100), so "
    "the fall is not the narrowing collaboration the paper describes; PFLlib's own code "
    "falls the same way (next session's note below; FedCAC "
    "dir rises throughout: 92.69 at round 17, 58.9 after round 1, 83.0 at 9). FedGC pat "
    "99.18 and FedCross pat 68.85, both at round 20 (no PFLlib figure; FedCross averages "
    "whole models as FedAvg does, FedGC keeps each client's head). "
    "pFedMe's dir gap (95.40 against 97.25): PFLlib's defaults (`algorithm.beta=0 "
    "algorithm.lam=1 algorithm.weight_decay=0.001 algorithm.aggregate_by=samples`: the global "
    "model never moves, so every round restarts each personal model from the initial one) give "
    "92.79, flat between 90.4 and 92.8 from round 1 to 20, below the paper's defaults. The "
    "pFedMe run commands published with PFLlib-based code that we found pass `-bt 1 -lam 15`, "
    "our defaults, so the gap left is most likely rounds (a best over up to 2,000 rounds "
    "against 20); not verified.",
    "- Seventh session (2026-11-27 evening). **FedCAC pat's fall is FedCAC's, not ours.** "
    "PFLlib's own FedCAC code on exactly these clients (`benchmarks/pfllib_crosscheck.py "
    "--algorithm FedCAC --flags='-tau 0.5 -bt 100'`, CPU) reaches 99.08 at round 9, holds "
    "98.0-98.6 to round 19 and falls to 92.18 in round 20. Ours with PFLlib's first round "
    "(`algorithm.skip_first_customization=true`: critical parameters back to the initial "
    "model after round 1) follows it to within 0.2 points for nine rounds (0.00 after round "
    "1, 97.47 after round 2, to 4 digits, as PFLlib's; 99.14 at round 9), then falls to "
    "92.6 by round 11, as our default row does from round 6-10. Both implementations thus "
    "fall by about 6-7 points after a plateau near 99; when is a matter of the run. A trace of "
    "the collaborator groups (6,000 samples) shows why such a fall can happen at all on this "
    "split: with beta = 100 the threshold stays near the mean overlap, and every client's "
    "critical parameters are averaged with its 3 peers of the same two classes and 2-4 "
    "clients of other classes, each round. Not a bug of ours; PFLlib reports no FMNIST "
    "figure for FedCAC.",
    "- Seventh session, first H200 call (8 at a time, 525 s): MOON 65.62 pat / 63.43 dir at "
    "round 20, 2.4 and 4.5 below FedAvg's 20-round rows (mu = 1, tau = 0.5; not investigated "
    "further; PFLlib reports no FMNIST figure). FedPAC 99.14 pat / 95.89 dir after 14 rounds, still rising; "
    "FedAS 98.85 pat / 95.49 dir after 5-6 rounds; FedPCL 99.31 / 85.89 after 7 (its first "
    "round trains nothing: no global prototype exists yet). FedAS (113-123 s of training a "
    "round) and FedPCL (96 s) were far slower there than MOON (18 s) or FedPAC (35 s), "
    "though on the CPU they cost 2-3x FedAvg; removing their per-batch host reads did not "
    "change their time alone or 4 at a time (`benchmarks/results/shared_gpu.md`), so the "
    "slowdown at 8 processes is not traced. A second call ran FedPCL again (beside that "
    "timing run): 99.37 pat / 88.89 dir after 9 rounds at 16-18 s of training a round, its "
    "curves within 0.003 of the first call's round by round. CPU rows (two or more runs at a "
    "time), all 20 rounds and none with a PFLlib FMNIST figure: FedMTL 99.20 pat / 97.47 dir; "
    "PFL-DA 99.21 pat / 97.37 dir; FedPHP 99.06 pat / 96.64 dir; FedGC dir 96.53; FedCross "
    "dir 65.14 (FedAvg 67.90). FedCP dir, 20 rounds on the CPU: 94.51, rising every round "
    "(78.8 after round 1, 91.3 at 9, +0.14 from 19 to 20), 3.4 below PFLlib's 97.89, a best "
    "over 2,000 rounds: the gap is one of rounds as far as 20 show. Per-FedAvg pat with the "
    "paper's settings finished its 20 rounds: 89.66 at round 11, 89.02 at 20 (the plateau its "
    "note above explains). FedAS dir finished its 20 rounds on the CPU: 97.06 at round 20 (no "
    "PFLlib figure; its first rounds equal the H200 row's, 90.92 after round 1 on both). FedBN pat 68.01 and FedProx pat 67.99 at round 19 of "
    "20 (CPU), level with FedAvg's 68.00: cnn4 has no BatchNorm layer, so FedBN is FedAvg on it. SCAFFOLD pat 71.29 at round 16 of 20 "
    "(CPU, alone).",
    "- Eighth session (2026-11-27, late). H200 call (8 at a time, 525 s): FedALA ran 7 rounds, "
    "98.83 pat (PFLlib 99.57) and 94.99 dir (97.66), both rising; round 1 took 72 s (61 of them "
    "in the evaluation that learns the weights to convergence), later rounds 39 s of training "
    "and 27 s of evaluation, which repeats the next round's weight learning (see the FedALA "
    "module). APPLE repeated its earlier rows to round 14 to the digit (99.32 / 97.59). CPU "
    "rows, two at a time: FedAS pat 99.13 (20); FedPCL 99.45 pat (14) / 95.44 dir (20, "
    "rising); FedPAC 99.19 pat (17) / 96.23 dir (20, rising); FedBN dir 67.89 (20; FedAvg "
    "67.90); APFL pat with the paper's alpha 88.87 at round 20, still climbing; GPFL dir 92.86 "
    "at round 19, rising about half a point a round (64.7 after round 1, 85.0 at 10), 4.95 "
    "below PFLlib's 97.81. FedBABU with `federation.eval_every=4` (its evaluation fine-tunes "
    "every client for 5 epochs, 5x a round's training, so every fourth round is evaluated): "
    "98.98 pat (PFLlib 99.41) and 96.88 dir (97.46) within 20 rounds. FedPer dir (96.36, 1.08 "
    "below PFLlib's 97.44): PFLlib's own FedPer code on exactly these clients "
    "(`pfllib_crosscheck.md`) reaches 96.82 at round 20, still rising, itself 0.62 below its "
    "published figure; the other 0.46 between the two implementations within 20 rounds is "
    "not traced. Per-FedAvg dir with PFLlib's settings (`algorithm.alpha=0.005 "
    "algorithm.passes=2`, CPU): 93.65 at round 14 of 20 (PFLlib 95.10), against 80.01 with "
    "the paper's: the settings explain most of that gap, as on pat. FedProx dir 67.83 at round "
    "20 (CPU), level with FedAvg's 67.90.",
    "- Ninth session (2026-11-27, night; CPU only). **FedCP dir's and GPFL dir's gaps are "
    "rounds.** PFLlib's own code on exactly these clients (`pfllib_crosscheck.md`, with our "
    "defaults `-lam 5` and `-lam 0.01 -mu 0.1`): FedCP reaches 94.68 at round 20, rising "
    "every round (78.83 after round 1, 90.80 at 9), against ours 94.51 (78.8, 91.3): the two "
    "implementations track each other within half a point, and both are 3.2-3.4 below "
    "PFLlib's 97.89 after 20 of its 2,000 rounds. GPFL reaches 94.51 at round 18 and ends at "
    "93.92 (69.25 after round 1, 90.20 at 10), 3.3 below its published 97.81; ours reaches "
    "92.86 at round 19 (64.7 after round 1, 85.0 at 10), 1.65 below PFLlib's code, within the "
    "3 points that the initial weights alone move GPFL's 20-round figure on pat (note above).",
    "- Ninth session, continued. **FedRoD dir (1.00 below) is rounds**: PFLlib's own code "
    "on these clients reaches 96.43 at round 20, still rising (82.60 after round 1, 95.05 at "
    "10), against ours 96.52 at round 18. **FedAMP dir's gap is the attraction term PFLlib "
    "leaves out**: PFLlib's client builds it from `.data`, without gradient, so its FedAMP "
    "trains every client alone; its code reaches 97.45 at round 19 on these clients (90.94 "
    "after round 1), ours with `algorithm.lam=0` (the same training) 97.53 at round 20 "
    "(90.92 after round 1), both above PFLlib's published 97.20, while the paper's term at "
    "PFLlib's λ = α_K = σ = 1 (our default) gives 94.44 (see the FedAMP module). CPU rows, "
    "two at a time: APPLE 99.35 pat / 97.64 dir (round 19 of 20; PFLlib 99.30 / 97.06). "
    "FedALA 99.14 pat (round 17; PFLlib 99.57) and 96.64 dir (round 20, still rising; PFLlib "
    "97.66); at round 7 both equal the H200 rows (98.83 pat, 94.99 dir); 41-51 s a round "
    "here, FedAMP with `lam=0` 36 s. APFL dir with the paper's alpha 0.5: "
    "79.10 at round 20, still climbing about a point a round (75.61 at 16, as on the H200); "
    "with PFLlib's 1.0 it is level with PFLlib (note above). FedBABU's `federation.eval_every=4` "
    "rows now count as protocol rows (see the line above the table).",
    "- Ninth session, crosschecks of issue 12's gaps. **FedALA dir (1.02 below) is "
    "rounds**: PFLlib's own code on these clients reaches 96.77 at round 20, still rising "
    "(83.05 after round 1, 95.94 at 10), against ours 96.64 (85.70, 95.74). **Per-FedAvg "
    "dir with PFLlib's settings (1.45 below) is rounds**: PFLlib's code (its defaults: both "
    "step sizes the learning rate, the local procedure run twice) reaches 93.93 at round 19 "
    "and moves between 91.8 and 93.9 from round 6 on, as ours does (93.65 at round 14, "
    "90.8-93.7 from round 6); it is itself 1.17 below its published 95.10 after 20 rounds.",
    "- Ninth session: **PFLlib's current pFedMe code evaluates the global model, not the "
    "personal ones**, so it cannot check our pFedMe dir gap (1.85). Its client keeps the "
    "personal parameters as the list its optimizer's step returns, which is the model's own "
    "parameters; when the next round's global model is copied into the model the personal "
    'parameters are that global model, and its "personalized" evaluation (before each '
    "round's training) scores it. On these clients with `-bt 1 -lam 15` (our defaults) it "
    "climbs as a global model does: 14.7 after round 1, 57.4 at 10, 65.6 at 20 (FedAvg: "
    "67.4 at 20), against our personal models' 95.40. The published 97.25 therefore comes "
    "from other code than today's; our gap stays unverified, most likely rounds "
    "(93.9 at round 7, 95.40 at 17). (`pfllib_crosscheck.py` now reads pFedMe's output; this "
    "run predates that fix, so its accuracies are read from its log.)",
    "- Tenth session (2026-11-28), the last gaps of issue 12. **Per-FedAvg pat with PFLlib's "
    "settings (1.33 below) is rounds**: PFLlib's own code on these clients reaches 98.00 at "
    "round 13 and ends at 97.46 (77.03 after round 1, 96.73 at 9), against ours 97.85 at "
    "round 20; it is itself 1.18 below its published 99.18 after 20 rounds. **pFedMe dir "
    "(1.85 below)**: until May 2023 PFLlib's pFedMe server evaluated after each round's "
    'training, when its aliased "personal" parameters hold the trained local model w (the '
    "current code evaluates before training and so scores the global model, note above). That "
    "code (commit 6d6bda4, `pfllib_crosscheck.py --legacy`, `-bt 1 -lam 15`) on these clients "
    "reaches 96.22 at round 20, still rising by under 0.1 a round (90.63 after round 1, "
    "95.65 at 10), 1.03 below its published 97.25: that figure is most likely of w after local "
    "training over more rounds, ours is of the personal models θ (95.40 at round 17), as the "
    "paper reports. Ours run on to 30 rounds (its first 20 the earlier row to the digit: 95.40 "
    "at round 17, 94.19 at 20) reaches 95.91 at round 25 and 95.65 at 30, 1.34 below, moving "
    "between 94.2 and 95.9 from round 13 on with a slow upward drift. APFL with PFLlib's "
    "`alpha=1.0` now ran 20 rounds on the CPU: 97.55 dir (PFLlib 97.25) and 99.21 pat (99.41). "
    "**MOON below FedAvg is MOON's**: PFLlib's own MOON code on these clients with our settings "
    "(`-mu 1 -tau 0.5`) reaches 62.52 at round 20 (dir; ours 63.43), its FedAvg 67.39.",
    "- The `dir` rows of ditto, fedproto, fedrep and scaffold on CPU dated 2026-11-26 ran "
    "before client train loaders dropped their last incomplete batch (PFLlib's drop_last); "
    "the rest ran with it.",
]
SCENARIOS = {
    "pat": {"data.partition": "pat", "data.classes_per_client": 2},
    "dir": {"data.partition": "dir", "data.alpha": 0.1},
}


def load_rows() -> list[dict]:
    return json.loads(ROWS.read_text()) if ROWS.exists() else []


def save_rows(rows: list[dict]) -> None:
    ROWS.parent.mkdir(parents=True, exist_ok=True)
    tmp = ROWS.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    os.replace(tmp, ROWS)


def row_key(r: dict) -> tuple:
    return (r["algorithm"], r["scenario"], r["rounds"], r["overrides"])


def run_row(
    algorithm: str,
    scenario: str,
    rounds: int,
    extra: list[str],
    runtime: list[str] = (),
    deadline: float | None = None,
) -> dict:
    """Run (or continue) one row. With ``deadline`` (a ``time.monotonic()`` value) the run stops
    after the first round that ends past it, and the row's ``rounds`` is the rounds it ran."""
    from fl_core.config import load_config
    from fl_core.engine import run
    from fl_core.engine.checkpoint import find_checkpoint

    overrides = [f"{k}={v}" for k, v in SCENARIOS[scenario].items()]
    overrides += [
        f"algorithm.name={algorithm}",
        f"federation.rounds={rounds}",
        "federation.checkpoint_every=2",
        *extra,
        *runtime,
    ]
    cfg = load_config(ROOT / "configs" / "default.yaml", overrides)
    # one folder per (algorithm, scenario, overrides): a longer run resumes a shorter one
    out = RUNS / f"{algorithm}-{scenario}{'-' + '-'.join(extra) if extra else ''}"
    resume = find_checkpoint(out) is not None
    t0 = time.perf_counter()

    def progress(rnd: int, rec) -> bool:
        acc = f" acc {rec.metrics['test_acc']:.4f}" if rec is not None else ""
        print(f"  {algorithm}/{scenario} round {rnd}/{rounds}{acc}", flush=True)
        return deadline is not None and 0 < rnd < rounds and time.monotonic() > deadline

    summary, cut = run_or_cut_off(
        lambda: run(cfg, out_dir=out, on_round=progress, resume=resume), out
    )
    rounds_run = summary["rounds"]
    if summary["stop_requested"]:
        why = "cut off by SIGTERM" if cut else "time budget spent"
        print(f"  {algorithm}/{scenario}: {why} after {rounds_run} rounds", flush=True)
    per_round = max(rounds_run, 1)
    return {
        "algorithm": algorithm,
        "scenario": scenario,
        "rounds": rounds_run,
        "overrides": extra,
        "best_test_acc": summary["best_test_acc"],
        "best_round": summary["best_round"],
        "final_test_acc": summary["final_test_acc"],
        "seconds_per_round": summary["seconds_per_round"],
        "bytes_up_per_round": summary["bytes_up"] / per_round,
        "bytes_down_per_round": summary["bytes_down"] / per_round,
        "wall_seconds_this_session": time.perf_counter() - t0,
        "resumed": resume,
        "cut_off": cut,
        "runtime": list(runtime),
        "device": cfg.device,
        "machine": machine_name(cfg.device),
        "date": time.strftime("%Y-%m-%d"),
    }


def device_label(r: dict) -> str:
    """``CPU (N cores)`` or the GPU's name, from a row's machine text."""
    parts = [p.strip() for p in r.get("machine", "").split(",")]
    if r.get("device", "cpu").startswith("cuda") and len(parts) > 2:
        return parts[2].removeprefix("NVIDIA ")
    return f"CPU ({parts[1]})" if len(parts) > 1 else "CPU"


def protocol_training(row: dict) -> bool:
    """Whether a row trained the protocol's models: no override, or only a sparser evaluation."""
    return all(o.startswith("federation.eval_every=") for o in row["overrides"])


def write_table(rows: list[dict]) -> None:
    lines = [
        "# PFLlib protocol on Fashion-MNIST: our best accuracy beside PFLlib's published figure",
        "",
        "20 clients, join ratio 1, 75/25 split, batch 10, 1 local epoch, lr 0.005, cnn4, every "
        "client evaluated every round. `pat` = pathological (2 classes per client), `dir` = "
        "practical Dirichlet(0.1). Best = best mean test accuracy over the evaluated rounds "
        "(round reached in brackets); PFLlib's figure is its best over 2,000 rounds. Seconds "
        "per round include the evaluation of every client and are those of the machine at "
        "the time, other jobs included (a row extended from a shorter run averages both "
        "sessions): compare them only within one session and one device (`on`: a GPU row ran "
        "beside other rows on one GPU machine, one process each). Written by "
        "`benchmarks/reproduce_pfllib.py`.",
        "",
        "| algorithm | scenario | rounds run | best (round) | PFLlib | gap | final | s/round "
        "| up MB/round | down MB/round | on |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    longest: dict[tuple, dict] = {}  # a shorter run of the same setting leaves the table
    for r in rows:
        k = (r["algorithm"], r["scenario"], tuple(r["overrides"]))
        if k not in longest or r["rounds"] > longest[k]["rounds"]:
            longest[k] = r
    shown = sorted(longest.values(), key=lambda r: (r["scenario"], r["algorithm"]))
    done = {
        (r["algorithm"], r["scenario"])
        for r in shown
        if r["rounds"] >= 20 and protocol_training(r) and r["algorithm"] in PUBLISHED
    }
    lines[-2:-2] = [
        f"Complete (20 rounds, protocol settings): {len(done)} of {2 * len(PUBLISHED)} "
        "(algorithm, scenario) pairs with a PFLlib figure. A row that only evaluates less "
        "often (`federation.eval_every`) counts: evaluation keeps no state and has its own "
        "random streams, so it trains exactly the protocol's models (tested in "
        "`tests/test_engine.py`), and its best is a lower bound of the best over every round. "
        "Where one setting ran several times the row of the most rounds is shown (all rows "
        "stay in the JSON).",
        "",
    ]
    for r in shown:
        pub = PUBLISHED.get(r["algorithm"])
        ref = pub[0 if r["scenario"] == "pat" else 1] if pub else None
        best = 100 * r["best_test_acc"]
        name = r["algorithm"] + (f" ({', '.join(r['overrides'])})" if r["overrides"] else "")
        lines.append(
            f"| {name} | {r['scenario']} | {r['rounds']} | {best:.2f} ({r['best_round']}) | "
            f"{'' if ref is None else f'{ref:.2f}'} | "
            f"{'' if ref is None else f'{best - ref:+.2f}'} | {100 * r['final_test_acc']:.2f} | "
            f"{r['seconds_per_round']:.1f} | {r['bytes_up_per_round'] / 1e6:.2f} | "
            f"{r['bytes_down_per_round'] / 1e6:.2f} | {device_label(r)} {r.get('date', '')} |"
        )
    lines += ["", *NOTES]
    ROWS.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    global ROWS, RUNS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algorithms", nargs="+", default=["fedavg", "ditto", "fedrep", "fedproto"])
    ap.add_argument("--scenarios", nargs="+", default=["pat", "dir"], choices=list(SCENARIOS))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override")
    ap.add_argument("--table", action="store_true", help="only rewrite the markdown table")
    ap.add_argument("--results", type=Path, default=ROWS, help="rows JSON (.md beside)")
    ap.add_argument("--runs", type=Path, default=RUNS, help="run folders")
    add_budget_options(ap)
    args = ap.parse_args()
    ROWS, RUNS = args.results.resolve(), args.runs.resolve()
    rows = load_rows()
    if args.merge:
        for path in args.merge:
            for row in json.loads(path.read_text()):
                rows = [r for r in rows if row_key(r) != row_key(row)] + [row]
        save_rows(rows)
        write_table(rows)
        return
    deadline = None if args.deadline is None else time.monotonic() + args.deadline
    if args.deadline is not None:  # a budgeted run: a kill by `timeout` still gives a row
        stop_on_sigterm()
    extra, runtime = split_runtime(list(args.extra))
    if not args.table:
        for scenario in args.scenarios:
            for algorithm in args.algorithms:
                key = (algorithm, scenario, args.rounds, extra)
                if any(row_key(r) == key for r in rows):
                    print(f"kept: {algorithm}/{scenario}/{args.rounds} rounds", flush=True)
                    continue
                if deadline is not None and time.monotonic() > deadline:
                    print(f"skipped (time budget spent): {algorithm}/{scenario}", flush=True)
                    continue
                row = run_row(algorithm, scenario, args.rounds, extra, runtime, deadline)
                rows = [r for r in load_rows() if row_key(r) != row_key(row)] + [row]
                save_rows(rows)
                write_table(rows)
    write_table(rows)


if __name__ == "__main__":
    sys.exit(main())
