# IV.B S'abonner à un topic -- adapted: host/port/credentials from argv; stops
# after --count messages (the course loops forever).
import paho.mqtt.client as mqtt

import common

a = common.args("B: subscribe", lambda p: p.add_argument("--count", type=int, default=1))
received = 0

def on_connect(client, userdata, flags, rc):
    print("Connected with result code => "+mqtt.connack_string(rc))

def on_subscribe(client, userdata, mid, granted_qos):
    print("Subscribed: " + str(mid) + " " + str(granted_qos))

def on_message(client, userdata, msg):
    global received
    print("Received message '" + str(msg.payload) + "' on topic '" + msg.topic + "' with QoS "
          + str(msg.qos))
    received += 1
    if received >= a.count:
        client.disconnect()

client = mqtt.Client()

client.on_subscribe = on_subscribe
client.on_message = on_message
client.on_connect = on_connect

try:
    client.username_pw_set(username=a.username, password=a.password)
    client.connect(a.host, a.port)

except:
    print("Connection Failed")

client.subscribe("isima/" + a.gx, qos=0)

client.loop_forever()
