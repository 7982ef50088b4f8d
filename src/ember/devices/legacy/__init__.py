"""Legacy PC devices Ember keeps: an 8250 UART and the i8042 reset line."""
