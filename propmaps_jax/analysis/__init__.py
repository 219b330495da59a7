"""What the paper measures: propagation maps, locality, saliency, and our controls.

- `propagation`: propagation maps |FM - FM_adv| and their statistics;
- `locality`: the paper's locality protocol (nearby / random moves, rings);
- `locality_controls`: our controls of its reading (fragility, colour, context);
- `locality_study`: the whole locality study of one model's attacks in one call
  (`locality_study`: Table 1, rings, vulnerability maps, the controls) and the
  loops the locality experiment runs;
- `saliency`: saliency maps, the measures that compare two maps, and the device
  computation of the salience study (`analyse_changes`);
- `claims`: the paper's sentences about the maps as numbers, with verdict rules;
  `claims_markdown` renders their report (claims.md);
- `statistics`: the maps over many attacks (running sums, controls, the initial
  populations) and the claims report of them;
- `paper_examples`: one attack's maps as figures 2-6 show them (`attack_maps`),
  and the attacks those figures show, chosen by rule (`paper_figures`);
- `salience`: the salience study in one call (`study_attacks`): its predictions,
  bootstrap intervals and verdicts;
- `readings`: receptive field or image content: what each reading predicts for the
  locality tests, the rule that decides between them, and the measures;
- `content`: one model's locality measures clustered by image (rates, rings, the
  within-image distance model with and without the colour difference);
- `content_controls`: controls drawn from the attacks' own colours, and a
  context-matched position also matched on distance from the centre;
- `within_image`: conditional (fixed-effects) logistic regression and the
  bootstrap over images (clusters) that every interval over positions uses.
"""

from propmaps_jax._lazy import submodule_getattr  # noqa: E402

__getattr__ = submodule_getattr(__name__, __path__)
