"""One rank's side of a plan switch: what it does with each step's switch command (`commands`),
the switch that does not stop serving (`switcher`), moving the engine from plan to plan and the
memory it needs (`mover`), and the expert messages between ranks (`transfer`)."""
