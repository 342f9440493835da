"""Pictures of what the efficiency techniques do: token overlays (pruning kept/dimmed, temporal-reuse
recomputed tokens tinted), a per-joint chunk panel, a text strip, frame composition
(:mod:`.overlay`); video / GIF writing with imageio (:mod:`.video`); a one-line terminal progress bar
that degrades to plain lines in CI logs (:mod:`.progress`)."""
