import TestKit
print("bench")
