"""The OpenCodeInterpreter loop: reply, run the last python block, feed the result back."""
