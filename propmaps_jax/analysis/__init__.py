"""What the paper measures: propagation maps, locality, saliency, and our controls.

- `propagation`: propagation maps |FM - FM_adv| and their statistics;
- `locality`: the paper's locality protocol (nearby / random moves, rings);
- `locality_controls`: our controls of its reading (fragility, colour, context);
- `saliency`: saliency maps, the measures that compare two maps, and the device
  computation of the salience study (`analyse_changes`);
- `claims`: the paper's sentences about the maps as numbers, with verdict rules;
- `readings`: receptive field or image content: what each reading predicts for the
  locality tests and the rule that decides between them.
"""
