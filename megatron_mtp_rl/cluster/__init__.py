"""The cluster around the trainer: Ray placement and launch, engine recovery, the colocated hand-off
(trainer offload ⇄ engine memory), and weight sync from the trainer ranks to the engines (DESIGN §10)."""
