"""What operators act on, computed from the stored data: coverage against targets, rollups, alarms."""
