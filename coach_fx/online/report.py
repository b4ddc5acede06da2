"""``OnlineModel.report``: the bands, their plans and each plan's calibration as tables."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tabulate import tabulate

if TYPE_CHECKING:
    from coach_fx.online import OnlineModel


def report(om: "OnlineModel") -> str:
    """The bands, their plans and each plan's calibration as tables."""
    out = []
    for with_cache in sorted(set(om.bands), reverse=True):
        edges, band_plans = om.bands[with_cache].edges_mbps, om.bands[with_cache].plans
        if not with_cache and om.bands[False] == om.bands[True]:
            continue
        rows = []
        lims = [0.0] + list(edges) + [math.inf]
        for k, pid in enumerate(band_plans):
            rows.append([f"{lims[k]:.2f}-{lims[k + 1]:.2f}", pid])
        out.append(("with the cache" if with_cache else "without the cache") + ": "
                   + ", ".join(f"{b} Mbit/s -> plan {p}" for b, p in rows))
    rows = []
    for pid, p in om.plans.items():
        v = om.variants[pid]
        c, t = v.cache, v.times
        ms = lambda host_s: om.settings.end.seconds(host_s) * 1e3  # noqa: E731 - the end's ms for host seconds
        rows.append([pid, ", ".join(p.cut) or "nothing (end-only)", v.profile.min_bits,
                     ms(t.host_s or 0),
                     f"+{ms(t.lookup_s):.2f} / {ms(t.hit_s):.2f}" if t.hit_s is not None else "-",
                     p.t_cloud * 1e3,
                     f"{ms(v.finish_on_end.host_s):.2f}" if v.finish_on_end is not None else "-",
                     f"{c.hit_rate:.0%} @ sim>={c.sim_threshold}, margin>={c.margin}, grid {c.grid}"
                     + (f", at {c.at}" if c.at else "") + (", context" if c.context else "")
                     if c else "off",
                     " ".join(f"{e}:{b}b" for e, b in c.bits_by_similarity) if c else "-"])
    head = (f"online plans: {len(om.plans)} distinct; fixed plan {om.offline} (for the network "
            f"as given, {om.settings.network.uplink_mbps:.2f} Mbit/s)\n" + "\n".join(out))
    return head + "\n" + tabulate(rows, headers=["plan", "cut", "min bits", "end ms",
                                                 "lookup / hit ms", "cloud ms", "rest on end ms",
                                                 "cache hits (calib.)",
                                                 "similarity -> bits"], floatfmt=".2f")
