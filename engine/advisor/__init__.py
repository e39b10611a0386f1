"""The settings advisor's parts that need models or state: the trial reconstruction that settles an unsure content
type (:mod:`engine.advisor.trial`) and the throughput estimates that learn from real runs
(:mod:`engine.advisor.estimates`). Pure image measurements live in :mod:`engine.image_analysis`, the rules in
:mod:`engine.intelligent_enhancer`."""
