"""Replica groups of a MoEDeployment (pure): their names and labels, a group as read, the
rollout decision (which groups to start, drain, remove or restart; surge before drain, one group
at a time) and what a run reports of its groups."""
